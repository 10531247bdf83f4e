"""fedforget's Flower ServerApp: training rounds recorded in a history store.

The same app runs on every engine: fedforget's in-process Grid, ``flwr run .`` with the
simulation engine, and a SuperLink with SuperNodes. The run directory (``out-dir``) holds
the history store; a directory that already holds rounds of the same configuration is
resumed from its last complete round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedforget.config import RunConfig
from fedforget.errors import HistoryError
from fedforget.history import HistoryStore
from fedforget.progress import RoundProgress
from fedforget.sampling import ClientSampler
from fedforget.task import (
    from_array_record,
    load_tensors,
    load_test_set,
    model_tensors,
    new_model,
    to_array_record,
)
from fedforget.training import evaluate
from strategies.history import HistoryRecording

log = logging.getLogger("fedforget.server")

IDENTIFY = "query.identify"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-rounds`` rounds (or resume), recording every round."""
    cfg = RunConfig.from_mapping(context.run_config)
    if not cfg.out_dir:  # e.g. a plain `flwr run .`: never write into the FAB's directory
        out = Path.home() / ".fedforget" / "runs" / f"flwr-run-{context.run_id}"
        log.warning("out-dir is not set; writing the run to %s", out)
        cfg = cfg.replace(out_dir=str(out))
    store = open_run_store(cfg)
    try:
        train(grid, cfg, store)
    finally:
        store.close()


def open_run_store(cfg: RunConfig) -> HistoryStore:
    """Create the run directory's store, or reopen it to resume the same configuration."""
    out = Path(cfg.out_dir)
    if (out / "history.sqlite").exists():
        store = HistoryStore.open(out)
        stored = {k: v for k, v in store.run_config.items() if k in cfg.training_mapping()}
        wanted = cfg.training_mapping()
        diff = [k for k in wanted if k in stored and stored[k] != wanted[k]]
        if diff:
            store.close()
            shown = ", ".join(f"{k} = {stored[k]!r} (now {wanted[k]!r})" for k in diff)
            raise HistoryError(
                f"run directory {str(out)!r} holds a run with another configuration: {shown}; "
                "use a new --out directory"
            )
        return store
    return HistoryStore.create(
        out,
        run_config=cfg.training_mapping(),
        codec=cfg.codec,
        retain_interval=cfg.retain_interval,
    )


def identify_clients(grid: Grid, expected: int, timeout: float = 600.0) -> dict[str, int]:
    """Ask every node for its stable client id; return client id -> node id."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise HistoryError(f"only {len(node_ids)} of {expected} nodes connected in time")
        time.sleep(1.0)
    messages = [
        Message(content=RecordDict(), dst_node_id=node, message_type=IDENTIFY)
        for node in node_ids
    ]
    clients: dict[str, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %d did not identify itself: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        cid = str(reply.content.config_records["client"]["client-id"])
        if cid in clients:
            raise HistoryError(f"two nodes report the same client id {cid!r}")
        clients[cid] = reply.metadata.src_node_id
    return clients


def build_strategy(cfg: RunConfig) -> Strategy:
    """The aggregation strategy (it trains every node the wrapper shows it)."""
    if cfg.strategy == "fedprox":
        return FedProx(
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
            min_evaluate_nodes=1, min_available_nodes=1, proximal_mu=cfg.proximal_mu,
        )
    return FedAvg(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
        min_available_nodes=1,
    )


def train(grid: Grid, cfg: RunConfig, store: HistoryStore) -> None:
    """Run the remaining rounds of ``cfg`` on ``grid``, committing each to ``store``."""
    clients = identify_clients(grid, cfg.num_clients)
    if store.last_round == 0 and store.initial_model_digest is None:
        store.put_initial_model(model_tensors(new_model(cfg)))
    done = store.last_round
    remaining = cfg.num_rounds - done
    global_model = store.global_model(done)
    test_set = load_test_set(cfg)
    model = new_model(cfg)
    progress = RoundProgress(total=cfg.num_rounds, start=done, enabled=cfg.progress)
    metrics_path = Path(cfg.out_dir) / "metrics.jsonl"

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t = server_round + done
        result = evaluate(load_tensors(model, from_array_record(arrays)), test_set)
        if server_round > 0:
            progress.update(t, accuracy=result.accuracy, loss=result.loss)
            with metrics_path.open("a") as fh:
                fh.write(json.dumps({"round": t, "test-accuracy": result.accuracy,
                                     "test-loss": result.loss}) + "\n")
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    wrapper = HistoryRecording(
        build_strategy(cfg),
        store=store,
        clients=clients,
        sampler=ClientSampler(seed=cfg.seed, count=cfg.clients_per_round()),
        run_seed=cfg.seed,
        round_offset=done,
        min_replies=cfg.min_replies,
        # federated evaluation on the clients' held-out splits after the last round
        evaluate_rounds=[cfg.num_rounds] if cfg.holdout_fraction > 0 else [],
    )
    try:
        if remaining > 0:
            wrapper.start(
                grid,
                initial_arrays=to_array_record(global_model),
                num_rounds=remaining,
                train_config=ConfigRecord(
                    {
                        "local-epochs": cfg.local_epochs,
                        "learning-rate": cfg.learning_rate,
                        "batch-size": cfg.batch_size,
                    }
                ),
                evaluate_fn=central_evaluate,
            )
    finally:
        wrapper.flush()  # every complete round reaches the store, even if a later one failed
        progress.close()
    evaluation = getattr(wrapper, "last_evaluation", None)
    if evaluation:
        (Path(cfg.out_dir) / "client_evaluation.json").write_text(
            json.dumps(evaluation, indent=2, sort_keys=True)
        )

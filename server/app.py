"""fedforget's Flower ServerApp: training rounds recorded in a history store, and unlearning.

The same app runs on every engine: fedforget's in-process Grid, ``flwr run .`` with the
simulation engine, and a SuperLink with SuperNodes. The run config key ``mode`` selects:

* ``train`` (default): train ``num-rounds`` rounds into the run directory (``out-dir``);
  a directory that already holds rounds of the same configuration is resumed from its
  last complete round. Withdrawn clients are never sampled.
* ``unlearn``: serve the withdrawal request ``request-id`` with ``method`` (and its
  ``method-params``, a JSON object); see :mod:`server.unlearning`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedforget.config import RunConfig
from fedforget.errors import HistoryError
from fedforget.history import HistoryStore
from fedforget.task import TensorDict, load_tensors, load_test_set, model_tensors, new_model
from fedforget.training import evaluate
from fedforget.withdrawal import WithdrawalLedger
from server.federation import GridFederation, identify_clients
from server.receipts import HeadSigner, signing_key

log = logging.getLogger("fedforget.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train (or resume), or serve a withdrawal request, as ``mode`` says."""
    cfg = RunConfig.from_mapping(context.run_config)
    if not cfg.out_dir:  # e.g. a plain `flwr run .`: never write into the FAB's directory
        out = Path.home() / ".fedforget" / "runs" / f"flwr-run-{context.run_id}"
        log.warning("out-dir is not set; writing the run to %s", out)
        cfg = cfg.replace(out_dir=str(out))
    if cfg.mode == "unlearn":
        from server.unlearning import serve_withdrawal

        serve_withdrawal(grid, cfg)
        return
    store = open_run_store(cfg)
    try:
        train(grid, cfg, store)
    finally:
        store.close()


def open_run_store(cfg: RunConfig) -> HistoryStore:
    """Create the run directory's store, or reopen it to resume the same configuration."""
    out = Path(cfg.out_dir)
    if (out / "history.sqlite").exists():
        store = HistoryStore.open(out, fsync=cfg.history_fsync)
        check_same_training(store, cfg)
        return store
    return HistoryStore.create(
        out,
        run_config=cfg.training_mapping(),
        codec=cfg.codec,
        retain_interval=cfg.retain_interval,
        fsync=cfg.history_fsync,
    )


def check_same_training(store: HistoryStore, cfg: RunConfig) -> None:
    """Refuse to use ``store`` with a configuration that trains differently.

    ``num-rounds`` may differ: a finished run can be extended with more rounds.
    """
    stored = store.run_config
    wanted = cfg.training_mapping()
    diff = [k for k in wanted
            if k in stored and stored[k] != wanted[k] and k != "num-rounds"]
    if diff:
        store.close()
        shown = ", ".join(f"{k} = {stored[k]!r} (now {wanted[k]!r})" for k in diff)
        raise HistoryError(
            f"run directory {str(store.directory)!r} holds a run with another configuration: "
            f"{shown}; use a new --out directory"
        )


def train(grid: Grid, cfg: RunConfig, store: HistoryStore) -> None:
    """Run the remaining rounds of ``cfg`` on ``grid``, committing each to ``store``."""
    clients = identify_clients(grid, cfg.num_clients)
    store.set_roster(list(clients))
    with WithdrawalLedger(store.directory) as ledger:
        withdrawn = ledger.withdrawn()
        for request in ledger.interrupted():
            log.warning(
                "withdrawal %s of %s was interrupted while unlearning; re-run it with "
                "`fedforget unlearn %s --client %s --method %s`", request.request_id,
                request.client_id, store.directory, request.client_id, request.method,
            )
    if store.last_round == 0 and store.initial_model_digest is None:
        store.put_initial_model(model_tensors(new_model(cfg)))
    test_set = load_test_set(cfg)
    scratch = new_model(cfg)
    metrics_path = Path(cfg.out_dir) / "metrics.jsonl"

    def central_evaluate(t: int, model: TensorDict) -> dict[str, float]:
        result = evaluate(load_tensors(scratch, model), test_set)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps({"round": t, "test-accuracy": result.accuracy,
                                 "test-loss": result.loss}) + "\n")
        return {"accuracy": result.accuracy, "loss": result.loss}

    key, _ = signing_key(cfg)
    federation = GridFederation(grid, cfg, clients)
    federation.replay(
        head_signer=HeadSigner(store, key),
        store=store,
        start_round=store.last_round + 1,
        end_round=cfg.num_rounds,
        exclude=withdrawn,
        on_round=central_evaluate,
        # federated evaluation on the clients' held-out splits after the last round
        evaluate_rounds=[cfg.num_rounds] if cfg.holdout_fraction > 0 else [],
    )
    evaluation = getattr(federation, "last_evaluation", None)
    if evaluation:
        (Path(cfg.out_dir) / "client_evaluation.json").write_text(
            json.dumps(evaluation, indent=2, sort_keys=True)
        )

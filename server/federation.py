"""The federation as the unlearning methods see it: Flower messages through the Grid.

:class:`GridFederation` implements :class:`fedforget.unlearning.Federation`. Ordinary
rounds (training, and the replays of exact unlearning) all go through
:meth:`GridFederation.replay`, i.e. :class:`strategies.history.HistoryRecording` around the
run's Flower strategy: one code path, so a replay reproduces training bit for bit.
Extra client work (FedEraser's calibration training, FedRecover's exact updates, PGA)
goes through :meth:`GridFederation.train`, the same ClientApp ``train`` handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedforget.config import RunConfig
from fedforget.errors import ClientReplyError, HistoryError
from fedforget.history import HistoryStore
from fedforget.progress import RoundProgress
from fedforget.sampling import ClientSampler, client_train_seed
from fedforget.task import TensorDict, from_array_record, to_array_record
from fedforget.unlearning.base import ClientUpdate, Cost
from strategies.history import HistoryRecording, check_train_reply

log = logging.getLogger("fedforget.server")

IDENTIFY = "query.identify"
TIMEOUT = 3600.0


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


def train_config(cfg: RunConfig, local_epochs: int | None = None) -> dict[str, Any]:
    """The local-training settings the server sends every round."""
    return {
        "local-epochs": local_epochs if local_epochs is not None else cfg.local_epochs,
        "learning-rate": cfg.learning_rate,
        "batch-size": cfg.batch_size,
    }


def _nbytes(model: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in model.values()))


class GridFederation:
    """Training and client requests over a Flower Grid, with their cost counted."""

    def __init__(self, grid: Grid, cfg: RunConfig, clients: Mapping[str, int]) -> None:
        self.grid = grid
        self.cfg = cfg
        self.clients = dict(clients)
        self.cost = Cost()
        self._client_of_node = {node: cid for cid, node in self.clients.items()}

    @property
    def roster(self) -> tuple[str, ...]:
        """Every client id that answered the identify query."""
        return tuple(sorted(self.clients))

    # ------------------------------------------------------------ ordinary rounds
    def replay(
        self,
        *,
        store: HistoryStore,
        start_round: int,
        end_round: int,
        exclude: Iterable[str],
        progress_label: str = "round",
        on_round: Callable[[int, TensorDict], dict[str, float] | None] | None = None,
        evaluate_rounds: Iterable[int] = (),
        head_signer: Any = None,
    ) -> TensorDict:
        """Ordinary recorded rounds ``start_round..end_round`` (see the Federation protocol).

        ``on_round(t, model)`` may return metrics to show in the progress line;
        ``head_signer`` (:class:`server.receipts.HeadSigner`) signs a tree head after each
        committed round and sends the latest to the clients.
        """
        cfg = self.cfg
        if start_round != store.last_round + 1:
            raise HistoryError(
                f"cannot replay from round {start_round}: {store.directory} ends at round "
                f"{store.last_round}"
            )
        num_rounds = end_round - start_round + 1
        model = store.global_model(start_round - 1)
        if num_rounds <= 0:
            return model
        progress = RoundProgress(total=end_round, start=start_round - 1, label=progress_label,
                                 enabled=cfg.progress)
        wrapper = HistoryRecording(
            build_strategy(cfg),
            store=store,
            clients=self.clients,
            sampler=ClientSampler(seed=cfg.seed, count=cfg.clients_per_round()),
            run_seed=cfg.seed,
            round_offset=start_round - 1,
            min_replies=cfg.min_replies,
            exclude=exclude,
            evaluate_rounds=evaluate_rounds,
            roster=store.roster() or None,
            on_commit=head_signer.on_commit if head_signer is not None else None,
            extra_config=head_signer.config if head_signer is not None else None,
        )

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            t = server_round + start_round - 1
            metrics = on_round(t, _tensors(arrays)) if on_round is not None else None
            progress.update(t, **(metrics or {}))
            return MetricRecord(dict(metrics)) if metrics else None

        try:
            result = wrapper.start(
                self.grid,
                initial_arrays=to_array_record(model),
                num_rounds=num_rounds,
                timeout=TIMEOUT,
                train_config=ConfigRecord(train_config(cfg)),
                evaluate_fn=after_round,
            )
        finally:
            records = wrapper.flush()
            progress.close()
            size = _nbytes(model)
            for record in records:
                asked = len(record.participants) + sum(
                    1 for r in record.refused if r.reason not in ("no reply", "not connected")
                )
                self.cost.rounds += 1
                self.cost.client_epochs += asked * cfg.local_epochs
                self.cost.bytes_sent += asked * size
                self.cost.bytes_received += len(record.participants) * size
                self.cost.client_seconds += sum(
                    float(p.metrics.get("train-seconds", 0.0)) for p in record.participants
                )
        self.last_evaluation = getattr(wrapper, "last_evaluation", None)
        return _tensors(result.arrays)

    # --------------------------------------------------------- direct requests
    def train(
        self,
        *,
        server_round: int,
        global_model: TensorDict,
        clients: Sequence[str],
        local_epochs: int | None = None,
        task: str = "train",
        extra_config: Mapping[str, Any] | None = None,
    ) -> dict[str, ClientUpdate]:
        """Ask ``clients`` to train from ``global_model``; nothing aggregated or recorded."""
        epochs = local_epochs if local_epochs is not None else self.cfg.local_epochs
        arrays = to_array_record(global_model)
        messages = []
        for cid in sorted(clients):
            if cid not in self.clients:
                raise ClientReplyError(f"client {cid!r} is not connected to this federation")
            config = ConfigRecord(train_config(self.cfg, epochs))
            config["server-round"] = server_round
            config["seed"] = client_train_seed(self.cfg.seed, server_round, cid)
            config["task"] = task
            for key, value in (extra_config or {}).items():
                config[key] = value
            if self.cfg.strategy == "fedprox" and task == "train":
                config["proximal-mu"] = self.cfg.proximal_mu
            messages.append(
                Message(
                    content=RecordDict({"arrays": arrays, "config": config}),
                    dst_node_id=self.clients[cid],
                    message_type=MessageType.TRAIN,
                    group_id=f"{task}-{server_round}",
                )
            )
        size = _nbytes(global_model)
        self.cost.rounds += 1
        self.cost.client_epochs += len(messages) * epochs
        self.cost.bytes_sent += len(messages) * size
        out: dict[str, ClientUpdate] = {}
        for reply in self.grid.send_and_receive(messages, timeout=TIMEOUT):
            cid = self._client_of_node.get(reply.metadata.src_node_id, "?")
            try:
                local, n, metrics = check_train_reply(reply, cid, global_model)
            except ClientReplyError as exc:
                log.warning("round %d (%s): refused reply from client %s: %s",
                            server_round, task, cid, exc)
                continue
            self.cost.bytes_received += size
            self.cost.client_seconds += float(metrics.get("train-seconds", 0.0))
            out[cid] = ClientUpdate(client_id=cid, local_model=local, num_examples=n,
                                    metrics=metrics)
        return dict(sorted(out.items()))

    def evaluate_local(self, model: TensorDict, clients: Sequence[str]) -> dict[str, float]:
        """Accuracy of ``model`` on each client's held-out split (not counted as cost)."""
        arrays = to_array_record(model)
        messages = [
            Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord({})}),
                dst_node_id=self.clients[cid],
                message_type=MessageType.EVALUATE,
            )
            for cid in sorted(clients)
            if cid in self.clients
        ]
        out: dict[str, float] = {}
        for reply in self.grid.send_and_receive(messages, timeout=TIMEOUT):
            cid = self._client_of_node.get(reply.metadata.src_node_id, "?")
            if reply.has_error():
                log.warning("evaluation failed on client %s", cid)
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            out[cid] = float(metrics["accuracy"])  # type: ignore[arg-type]
        return dict(sorted(out.items()))


def _tensors(arrays: ArrayRecord) -> TensorDict:
    return from_array_record(arrays)

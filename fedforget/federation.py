"""The federation as fedforget drives it: Flower messages through a ServerApp's Grid.

:class:`GridFederation` implements :class:`fedforget.unlearning.Federation` for any Flower
app: it holds the app's own strategy (a fresh copy per replay), the app's train config and
the run's :class:`~fedforget.settings.RecordingSettings`. Ordinary rounds — training, and
the replays of exact unlearning — all go through :meth:`GridFederation.replay`, i.e.
:class:`fedforget.strategies.history.HistoryRecording` around the app's strategy: one code
path, so that a replay reproduces training bit for bit. Extra client work (FedEraser's
calibration training, FedRecover's exact updates, PGA's ascent) goes through
:meth:`GridFederation.train`, to the same ClientApp ``train`` handler.

:func:`identify_clients` asks every node for its stable client id (the identify message of
:mod:`fedforget.protocol`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedforget import protocol
from fedforget.arrays import TensorDict, from_array_record, to_array_record
from fedforget.errors import ClientReplyError, HistoryError
from fedforget.history import HistoryStore, RoundRecord
from fedforget.identity import NodePins
from fedforget.progress import RoundProgress, phase
from fedforget.protocol import WithdrawalAsk, read_ask
from fedforget.sampling import ClientSampler, client_train_seed
from fedforget.settings import DEFAULT_REPLY_TIMEOUT, RecordingSettings
from fedforget.strategies.history import HistoryRecording, check_train_reply, clients_per_round
from fedforget.unlearning.base import ClientUpdate, Cost, UnlearningError

log = logging.getLogger("fedforget.server")

__all__ = ["FederationApp", "GridFederation", "identify_clients"]

EVALUATION_BATCH = 256
"""Clients asked per batch of evaluate messages (progress is shown between batches)."""

ACCURACY_KEYS = ("accuracy", "eval_acc", "eval-acc", "acc")
"""Metric names read as a client's held-out accuracy in an evaluate reply, in this order."""


def identify_clients(grid: Grid, expected: int, timeout: float = 600.0,
                     asks: list[WithdrawalAsk] | None = None,
                     extra_config: Mapping[str, Any] | None = None,
                     sizes: dict[str, int] | None = None,
                     *, want_sizes: bool = False,
                     pins: NodePins | None = None,
                     reply_timeout: float | None = None,
                     progress: bool = False) -> dict[str, int]:
    """Ask every node for its stable client id; return client id -> node id.

    Waits until ``expected`` nodes are connected (at most ``timeout`` seconds, looking
    again after 10 ms, then less and less often, at most every second), then for
    their answers at most ``reply_timeout`` seconds (default ``timeout``). Withdrawals
    the clients asked for themselves are appended to ``asks``. ``extra_config`` goes with
    the message (the latest signed tree head, which every client keeps). With
    ``want_sizes`` the message asks for the clients' data sizes
    (:data:`fedforget.protocol.WANT_NUM_EXAMPLES`); those reported (``num-examples``, when
    their app tells the mod) go into ``sizes``. A node claiming a
    client id that another node already speaks for — in this identification, or by a pin
    of ``pins`` (:class:`fedforget.identity.NodePins`) — is refused, logged and recorded,
    and left out; the others go on. ``progress`` shows the phase for large federations.
    """
    with phase(f"identifying {expected} clients", enabled=progress and expected >= 100):
        if want_sizes:
            extra_config = {**(extra_config or {}), protocol.WANT_NUM_EXAMPLES: True}
        return _identify(grid, expected, timeout, asks, extra_config, sizes, pins,
                         reply_timeout)


def _identify(grid: Grid, expected: int, timeout: float, asks: list[WithdrawalAsk] | None,
              extra_config: Mapping[str, Any] | None, sizes: dict[str, int] | None,
              pins: NodePins | None, reply_timeout: float | None) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    pause = 0.01
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise HistoryError(f"only {len(node_ids)} of {expected} nodes connected in time")
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)
    config = ConfigRecord({**(extra_config or {}), protocol.TASK: protocol.IDENTIFY})
    messages = [
        Message(content=RecordDict({protocol.CONFIG_RECORD: config}), dst_node_id=node,
                message_type=MessageType.TRAIN, group_id="identify")
        for node in node_ids
    ]
    clients: dict[str, int] = {}
    pins = pins if pins is not None else NodePins(None, pin=False)
    replies = list(grid.send_and_receive(
        messages, timeout=reply_timeout if reply_timeout is not None else timeout))
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not identify itself: %s", node, reply.error.reason)
            continue
        record = reply.content.get(protocol.CLIENT_RECORD)
        cid = record.get(protocol.CLIENT_ID) if isinstance(record, ConfigRecord) else None
        if not isinstance(cid, str) or not cid:
            log.warning(
                "node %d answered the identify message without a client id (a "
                "ConfigRecord %r with %r): is fedforget's client mod "
                "(fedforget.flower.unlearning_mod) in its ClientApp's mods?",
                node, protocol.CLIENT_RECORD, protocol.CLIENT_ID,
            )
            continue
        refusal = pins.check(cid, node, clients)
        if refusal is not None:
            pins.refuse(refusal)
            continue
        clients[cid] = node
        size = record.get(protocol.NUM_EXAMPLES) if isinstance(record, ConfigRecord) else None
        if sizes is not None and isinstance(size, int) and not isinstance(size, bool):
            sizes[cid] = size
        ask = read_ask(record, cid, node)
        if ask is not None and asks is not None:
            asks.append(ask)
    pins.save()
    return dict(sorted(clients.items()))


@dataclass(frozen=True)
class FederationApp:
    """What the federation needs of the Flower app it drives.

    Attributes
    ----------
    strategy : Strategy
        The app's strategy as the app built it; every replay trains with a fresh copy, so
        that nothing one replay does carries over to another.
    train_config : Mapping
        The app's train config, sent in every train message (as ``strategy.start`` sends it).
    local_epochs : int
        The app's local epochs per round (1 when unknown: cost is then counted in
        client-rounds).
    local_epochs_key : str, optional
        The name of the app's local-epochs setting (a train-config or run-config key), so
        that a method can ask for other epochs (FedEraser's calibration); None when the app
        has none.
    """

    strategy: Strategy
    train_config: Mapping[str, Any]
    local_epochs: int = 1
    local_epochs_key: str | None = None

    def fresh_strategy(self) -> Strategy:
        """A copy of the app's strategy, as it was before any round."""
        return copy.deepcopy(self.strategy)


def _nbytes(model: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in model.values()))


class GridFederation:
    """Training and client requests over a Flower Grid, with their cost counted."""

    def __init__(
        self,
        grid: Grid,
        clients: Mapping[str, int],
        *,
        app: FederationApp,
        settings: RecordingSettings,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        progress: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.grid = grid
        self.sizes = dict(sizes or {})
        self.clients = dict(clients)
        self.app = app
        self.settings = settings
        self.reply_timeout = reply_timeout
        self.progress = progress
        self.cost = Cost()
        self.last_evaluation: dict[str, dict[str, Any]] | None = None
        self.last_result: Any = None  # the Flower Result of the last replay
        self._client_of_node = {node: cid for cid, node in self.clients.items()}

    @property
    def roster(self) -> tuple[str, ...]:
        """Every client id that answered the identify message."""
        return tuple(sorted(self.clients))

    @property
    def local_epochs(self) -> int:
        """The app's local epochs per round."""
        return self.app.local_epochs

    def sampler(self, roster_size: int) -> ClientSampler:
        """The run's client sampler (seeded by the run seed, by stable id)."""
        count = clients_per_round(self.app.strategy, roster_size,
                                  self.settings.clients_per_round)
        return ClientSampler(seed=self.settings.seed, count=count)

    # ------------------------------------------------------------ ordinary rounds
    def replay(
        self,
        *,
        store: HistoryStore,
        start_round: int,
        end_round: int,
        exclude: Iterable[str],
        progress_label: str = "round",
        on_round: Callable[[int, TensorDict], Mapping[str, float] | None] | None = None,
        evaluate_rounds: Iterable[int] | None = (),
        head_signer: Any = None,
        evaluate_config: Mapping[str, Any] | None = None,
        refresh_exclude: Callable[[], Iterable[str]] | None = None,
        on_ask: Callable[[WithdrawalAsk], None] | None = None,
    ) -> TensorDict:
        """Ordinary recorded rounds ``start_round..end_round`` (see the Federation protocol).

        ``on_round(t, model)`` may return metrics to show in the progress line;
        ``head_signer`` (:class:`fedforget.history.HeadLog`) signs a tree head after each
        committed round (on the store's writer thread, right after the round's write) and
        the latest signed head goes to the clients with the next round; ``evaluate_rounds``
        (None: as the app's strategy decides) are the rounds with federated evaluation.
        """
        if start_round != store.last_round + 1:
            raise HistoryError(
                f"cannot replay from round {start_round}: {store.directory} ends at round "
                f"{store.last_round}"
            )
        num_rounds = end_round - start_round + 1
        model = store.global_model(start_round - 1)
        if num_rounds <= 0:
            return model
        roster = store.roster() or self.roster
        progress = RoundProgress(total=end_round, start=start_round - 1, label=progress_label,
                                 enabled=self.progress)
        size = _nbytes(model)

        def committed(record: RoundRecord) -> None:
            self._count(record, size)

        wrapper = HistoryRecording(
            self.app.fresh_strategy(),
            store=store,
            clients=self.clients,
            sampler=self.sampler(len(roster)),
            run_seed=self.settings.seed,
            round_offset=start_round - 1,
            min_replies=self.settings.min_replies,
            exclude=exclude,
            evaluate_rounds=evaluate_rounds,
            roster=roster,
            on_commit=committed,
            after_write=head_signer.on_commit if head_signer is not None else None,
            extra_config=head_signer.config if head_signer is not None else None,
            refresh_exclude=refresh_exclude,
            on_ask=on_ask,
            policy=self.settings.robust_policy(),
            recorded_sizes=self.sizes,
        )

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            t = server_round + start_round - 1
            metrics = on_round(t, from_array_record(arrays)) if on_round is not None else None
            progress.update(t, **(metrics or {}))
            return MetricRecord(dict(metrics)) if metrics else None

        try:
            result = wrapper.start(
                self.grid,
                initial_arrays=to_array_record(model),
                num_rounds=num_rounds,
                timeout=self.reply_timeout,
                train_config=ConfigRecord(dict(self.app.train_config)),
                evaluate_config=ConfigRecord(dict(evaluate_config or {})),
                evaluate_fn=after_round,
            )
        finally:
            wrapper.flush()
            progress.close()
        self.last_evaluation = getattr(wrapper, "last_evaluation", None)
        self.last_result = result
        return from_array_record(result.arrays)

    def _count(self, record: RoundRecord, size: int) -> None:
        """Add the cost of one committed round (each client asked trains the app's epochs
        and exchanges the model once each way)."""
        asked = len(record.participants) + sum(
            1 for r in record.refused if r.reason not in ("no reply", "not connected")
        )
        self.cost.rounds += 1
        self.cost.client_epochs += asked * self.local_epochs
        self.cost.bytes_sent += asked * size
        self.cost.bytes_received += len(record.participants) * size
        self.cost.client_seconds += sum(
            float(p.metrics.get("train-seconds", 0.0)) for p in record.participants
        )

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
        """Ask ``clients`` to train from ``global_model``; nothing aggregated or recorded.

        ``local_epochs`` other than the app's needs the app's ``local_epochs_key``;
        ``task`` other than ``"train"`` names a client-side procedure
        (:mod:`fedforget.unlearning.client_tasks`).
        """
        epochs = local_epochs if local_epochs is not None else self.local_epochs
        if epochs != self.local_epochs and self.app.local_epochs_key is None:
            raise UnlearningError(
                f"a method asked for {epochs} local epochs, but this app's clients choose "
                "their own (no local-epochs setting was named: give local_epochs_key to "
                "fedforget's Unlearnable)"
            )
        arrays = to_array_record(global_model)
        messages = []
        for cid in sorted(clients):
            if cid not in self.clients:
                raise ClientReplyError(f"client {cid!r} is not connected to this federation")
            config = ConfigRecord(dict(self.app.train_config))
            config["server-round"] = server_round
            config[protocol.SEED] = client_train_seed(self.settings.seed, server_round, cid)
            if task != "train":
                config[protocol.TASK] = task
            if epochs != self.local_epochs or task != "train":
                key = self.app.local_epochs_key
                if key is not None:
                    config[protocol.LOCAL_EPOCHS] = epochs
                    config[protocol.LOCAL_EPOCHS_KEY] = key
                    if key in config:
                        config[key] = epochs
            proximal_mu = getattr(self.app.strategy, "proximal_mu", None)
            if proximal_mu is not None and task == "train":
                config["proximal-mu"] = float(proximal_mu)
            for key, value in (extra_config or {}).items():
                config[key] = value
            messages.append(
                Message(
                    content=RecordDict({"arrays": arrays, protocol.CONFIG_RECORD: config}),
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
        for reply in self.grid.send_and_receive(messages, timeout=self.reply_timeout):
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

    def send_config(self, client_id: str, config: Mapping[str, Any]) -> ConfigRecord | None:
        """Send ``client_id`` a train message carrying only ``config`` (a client protocol
        step, e.g. a receipt delivery); return its reply's ``"fedforget"`` record, or None
        if it did not answer (or answered with an error)."""
        if client_id not in self.clients:
            return None
        message = Message(
            content=RecordDict({protocol.CONFIG_RECORD: ConfigRecord(dict(config))}),
            dst_node_id=self.clients[client_id], message_type=MessageType.TRAIN,
            group_id=str(config.get(protocol.TASK, "fedforget")),
        )
        for reply in self.grid.send_and_receive([message], timeout=self.reply_timeout):
            if reply.has_error():
                log.warning("client %s refused %s: %s", client_id,
                            config.get(protocol.TASK), reply.error.reason)
                return None
            record = reply.content.get(protocol.CLIENT_RECORD)
            return record if isinstance(record, ConfigRecord) else None
        return None

    def evaluate_local(self, model: TensorDict, clients: Sequence[str]) -> dict[str, float]:
        """Accuracy of ``model`` on each client's held-out data (not counted as cost).

        The accuracy is the first of :data:`ACCURACY_KEYS` in a client's evaluate reply; a
        client whose reply has none is left out.
        """
        arrays = to_array_record(model)
        messages = [
            Message(
                content=RecordDict({"arrays": arrays, protocol.CONFIG_RECORD: ConfigRecord({})}),
                dst_node_id=self.clients[cid],
                message_type=MessageType.EVALUATE,
            )
            for cid in sorted(clients)
            if cid in self.clients
        ]
        out: dict[str, float] = {}
        # Many clients are asked in batches, so that progress can be shown between them.
        batch = EVALUATION_BATCH if len(messages) > EVALUATION_BATCH else max(1, len(messages))
        progress = RoundProgress(total=len(messages), label="clients evaluated", every=1,
                                 enabled=self.progress and len(messages) > batch)
        for start in range(0, len(messages), batch):
            chunk = messages[start:start + batch]
            for reply in self.grid.send_and_receive(chunk, timeout=self.reply_timeout):
                cid = self._client_of_node.get(reply.metadata.src_node_id, "?")
                if reply.has_error():
                    log.warning("evaluation failed on client %s", cid)
                    continue
                for record in reply.content.metric_records.values():
                    found = next((k for k in ACCURACY_KEYS if k in record), None)
                    if found is not None:
                        out[cid] = float(record[found])  # type: ignore[arg-type]
                        break
            progress.update(start + len(chunk))
        progress.close()
        return dict(sorted(out.items()))

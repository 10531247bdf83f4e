"""History recording around any Flower strategy.

:class:`HistoryRecording` wraps a Flower :class:`~flwr.serverapp.strategy.Strategy`
(FedAvg, FedProx, ...) and adds what federated unlearning needs:

* clients are selected by **stable client id** with a seeded generator
  (:class:`fedforget.sampling.ClientSampler`), never by Flower's random node ids;
* each selected client gets its own training seed in the train config;
* replies are **validated** (keys, shapes, finite values, example count, identity);
  a bad reply is refused with a logged reason naming client and round, and the round
  goes on without it, unless fewer than ``min_replies`` valid replies remain
  (then :class:`~fedforget.errors.RoundFailedError`, and nothing of the round is stored);
* replies are aggregated in **client-id order**, so sums never depend on arrival order;
* every client's update :math:`\\Delta_{t,k} = \\theta_{t,k} - \\theta_t`, its example count
  and weight, and the aggregated :math:`\\theta_{t+1}` are committed to the
  :class:`~fedforget.history.HistoryStore` as one atomic round.

With ``background_commit=True`` (the default) a round is committed in two halves: its
validation, encoding, hashing and record (:meth:`~fedforget.history.HistoryStore.prepare_round`,
pure computation) on the training thread, and its writes and fsyncs
(:meth:`~fedforget.history.HistoryStore.write_round`, I/O that releases the GIL) on one
background writer thread, in round order, overlapping the next round's training;
:meth:`HistoryRecording.flush` waits for them. (Python work on the writer thread would
contend with training for the GIL; measured, it costs more than doing it in line.) The one
exception is ``after_write`` (the server's tree-head signature, about 1 ms of CPU a round):
it follows its round's write on the writer thread, so that its log's fsync and the
signature's lock do not hold up the next round. A round
that cannot be recorded stops training at once, a write that fails at the next round. A
killed process leaves the store at its last complete round either way.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedforget import protocol
from fedforget.arrays import TensorDict, from_array_record, to_array_record
from fedforget.errors import ClientReplyError, RoundFailedError
from fedforget.history import HistoryStore, ParticipantUpdate, RoundRecord
from fedforget.history.records import RefusedReply
from fedforget.history.store import PreparedRound
from fedforget.robust import RobustPolicy, screen_reply
from fedforget.sampling import ClientSampler, client_train_seed
from fedforget.settings import WEIGHTED_MEAN
from fedforget.tensors import tensors_digest

log = logging.getLogger("fedforget.strategies")

CLIENT_RECORD = protocol.CLIENT_RECORD  # ConfigRecord key carrying the stable client id


def clients_per_round(strategy: Strategy, roster_size: int, given: int = 0) -> int:
    """How many clients a round trains: ``given`` if set, else the wrapped strategy's own
    count over the roster (Flower's FedAvg: ``max(min_train_nodes, int(fraction_train·N))``),
    else all of them."""
    if given:
        return given
    fraction = getattr(strategy, "fraction_train", None)
    if isinstance(fraction, int | float) and not isinstance(fraction, bool):
        minimum = int(getattr(strategy, "min_train_nodes", 1) or 1)
        return max(1, min(roster_size, max(minimum, int(roster_size * float(fraction)))))
    return max(1, roster_size)


def train_every_shown_node(strategy: Strategy) -> Strategy:
    """A copy of ``strategy`` that trains every node it is shown.

    fedforget samples by stable id and shows the wrapped strategy only the selected nodes;
    a strategy of Flower's FedAvg family would sample again among them (``fraction_train``)
    and wait for ``min_available_nodes``. The copy (the caller's object is left as it was)
    has ``fraction_train = 1``, ``min_train_nodes = min_available_nodes = 1`` and
    ``min_evaluate_nodes = 1``; its ``fraction_evaluate`` is the caller's. A strategy
    without these settings is used as it is (it must train every node it is shown).
    """
    if not hasattr(strategy, "fraction_train"):
        return strategy
    view = copy.copy(strategy)
    setattr(view, "fraction_train", 1.0)  # noqa: B010 - any strategy of the FedAvg family
    for name in ("min_train_nodes", "min_available_nodes", "min_evaluate_nodes"):
        if hasattr(view, name):
            setattr(view, name, 1)
    return view


def check_train_reply(
    reply: Message, client_id: str, global_model: Mapping[str, np.ndarray]
) -> tuple[TensorDict, int, dict[str, float]]:
    """Validate a train reply against the model sent; return (local model, n, metrics).

    Raises :class:`~fedforget.errors.ClientReplyError` naming what is wrong: a client
    error, another client's id, missing or extra records, a bad example count, wrong
    keys, shapes or dtypes, NaN/Inf values.
    """
    if reply.has_error():
        reason = (reply.error.reason or "").strip().splitlines()
        raise ClientReplyError(f"client error: {reason[-1] if reason else reply.error.code}")
    # One pass over the records (RecordDict.array_records & co. build a new dict per use).
    identity: ConfigRecord | None = None
    arrays: list[ArrayRecord] = []
    metric_records: list[MetricRecord] = []
    for key, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            arrays.append(record)
        elif isinstance(record, MetricRecord):
            metric_records.append(record)
        elif key == CLIENT_RECORD and isinstance(record, ConfigRecord):
            identity = record
    reported = identity.get(protocol.CLIENT_ID) if identity is not None else None
    if reported != client_id:
        raise ClientReplyError(f"reported client id {reported!r}, expected {client_id!r}")
    if len(arrays) != 1 or len(metric_records) != 1:
        raise ClientReplyError(
            f"expected one ArrayRecord and one MetricRecord, got "
            f"{len(arrays)} and {len(metric_records)}"
        )
    metrics_record = metric_records[0]
    n = metrics_record.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int | float) or n <= 0 or n != int(n):
        raise ClientReplyError(f"num-examples = {n!r}, expected a positive integer")
    local = from_array_record(arrays[0])
    if list(local) != list(global_model):
        missing = sorted(set(global_model) - set(local))
        extra = sorted(set(local) - set(global_model))
        raise ClientReplyError(f"wrong keys: missing {missing}, unexpected {extra}")
    for key, value in local.items():
        expected = global_model[key]
        if value.shape != expected.shape:
            raise ClientReplyError(
                f"tensor {key!r} has shape {value.shape}, expected {expected.shape}"
            )
        if value.dtype != expected.dtype:
            raise ClientReplyError(
                f"tensor {key!r} has dtype {value.dtype}, expected {expected.dtype}"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise ClientReplyError(f"tensor {key!r} has {bad} NaN/Inf values")
    metrics = {
        k: float(v)
        for k, v in metrics_record.items()
        if k != "num-examples" and isinstance(v, int | float) and math.isfinite(float(v))
    }
    return local, int(n), metrics


def _plain_fedavg_aggregation(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates exactly as Flower's FedAvg (FedAvg, FedProx, ...)."""
    return (
        isinstance(strategy, FedAvg)
        and type(strategy).aggregate_train is FedAvg.aggregate_train
        and strategy.weighted_by_key == "num-examples"
    )



def aggregation_kind(strategy: Strategy) -> str:
    """How ``strategy`` aggregates, as the history records it (``aggregation`` of the
    recording settings): ``weighted-mean`` for Flower's FedAvg arithmetic weighted by
    example count (FedAvg, FedProx: every global model is
    :math:`\\sum_k n_k \theta_{t,k} / \\sum_k n_k`, which server-side methods may rely on),
    else the strategy's class (``flwr.serverapp.strategy.FedMedian``)."""
    if _plain_fedavg_aggregation(strategy):
        return WEIGHTED_MEAN
    kind = type(strategy)
    return f"{kind.__module__}.{kind.__qualname__}"


class _NodeSubsetGrid(Grid):
    """A view of a Grid that shows only some nodes (for the wrapped strategy's sampling)."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run):  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102,E501
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self._node_ids)

    def push_messages(self, messages):  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102,E501
        return self._grid.send_and_receive(messages, timeout=timeout)


@dataclass
class _PendingRound:
    round: int
    global_model: TensorDict
    selected: list[str]
    seeds: dict[str, int]
    config: dict[str, object]
    refused: list[RefusedReply] = field(default_factory=list)


class HistoryRecording(Strategy):
    """Wrap ``strategy`` so that every round is sampled by stable id and recorded.

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy that aggregates (the caller's, e.g. FedAvg with its own
        ``fraction_train``: see :func:`train_every_shown_node`).
    store : HistoryStore
        Where rounds are committed.
    clients : Mapping[str, int]
        Stable client id -> current Flower node id (from the identify query).
    sampler : ClientSampler
        Seeded selection of client ids per round.
    run_seed : int
        The run seed (each client's per-round training seed derives from it).
    round_offset : int
        Rounds already in the store (Flower's round counter restarts at 1 on resume).
    min_replies : int
        Fewest valid replies a round may be aggregated from.
    exclude : Iterable[str]
        Clients never to select (withdrawn).
    evaluate_rounds : Iterable[int], optional
        Rounds after which the clients evaluate on their held-out data; None: every round
        in which the wrapped strategy configures an evaluation.
    background_commit : bool
        Commit rounds on a writer thread (call :meth:`flush` at the end).
    roster : Iterable[str], optional
        The ids the sampler draws from (default: ``clients``). Giving the run's recorded
        roster keeps the schedule when some clients are no longer connected; a selected
        client that is not connected counts as a missing reply.
    on_commit : callable, optional
        Called with each committed record, in round order, on this thread.
    after_write : callable, optional
        Called with each committed record, in round order, right after its commit, on the
        thread that committed it (the writer thread with ``background_commit``): the server
        signs a new tree head with it, so that the head's signature and its log's fsync
        overlap the next round's training instead of delaying it. An exception it raises
        fails the round's commit (raised at the next round or by :meth:`flush`).
    extra_config : callable, optional
        Extra train-config entries for every message of a round (the latest tree head).
    refresh_exclude : callable, optional
        Called before each round; the clients it returns are excluded too (withdrawals
        recorded while training runs take effect from the next round).
    on_ask : callable, optional
        Called with each :class:`~fedforget.protocol.WithdrawalAsk` a reply carries (a
        client asking to leave); the client is excluded from the next round on.
    policy : RobustPolicy, optional
        Screening of every valid reply (:func:`fedforget.robust.screen_reply`): an update
        norm bound, a cap on the reported example count; a refused reply is recorded in the
        round's ``refused`` with the reason, a clipped or capped one is aggregated as
        screened, with its figures in its participant metrics.
    recorded_sizes : mapping, optional
        Each client's data size as it reported it when it identified itself (the bound of
        the example-count cap; a client without one is not capped).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        store: HistoryStore,
        clients: Mapping[str, int],
        sampler: ClientSampler,
        run_seed: int,
        round_offset: int = 0,
        min_replies: int = 1,
        exclude: Iterable[str] = (),
        evaluate_rounds: Iterable[int] | None = (),
        background_commit: bool = True,
        roster: Iterable[str] | None = None,
        on_commit: Callable[[RoundRecord], None] | None = None,
        after_write: Callable[[RoundRecord], None] | None = None,
        extra_config: Callable[[], Mapping[str, str]] | None = None,
        refresh_exclude: Callable[[], Iterable[str]] | None = None,
        on_ask: Callable[[protocol.WithdrawalAsk], None] | None = None,
        policy: RobustPolicy | None = None,
        recorded_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.strategy = train_every_shown_node(strategy)
        self.store = store
        self.clients = dict(clients)
        self.roster = tuple(sorted(roster if roster is not None else self.clients))
        self.on_commit = on_commit
        self.after_write = after_write
        self.extra_config = extra_config
        self.sampler = sampler
        self.run_seed = run_seed
        self.round_offset = round_offset
        self.min_replies = min_replies
        self.exclude = frozenset(exclude)
        self.refresh_exclude = refresh_exclude
        self.on_ask = on_ask
        self.policy = policy
        self.recorded_sizes = dict(recorded_sizes or {})
        self.evaluate_rounds = None if evaluate_rounds is None else frozenset(evaluate_rounds)
        self._client_of_node = {node: cid for cid, node in self.clients.items()}
        self._pending: _PendingRound | None = None
        self._global_digest = store.model_digest(store.last_round)
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedforget-history")
            if background_commit
            else None
        )
        self._commits: list[Future[RoundRecord]] = []
        # Records are handed to on_commit and not kept: memory stays flat over any number
        # of rounds (the store has them all).
        self.committed_rounds = 0

    # ------------------------------------------------------------------ commits
    def _commit(self, **kwargs: object) -> None:
        if self._writer is None:
            record = self.store.commit_round(**kwargs)  # type: ignore[arg-type]
            self._committed(self._written(record))
            return
        self._raise_failed_commit()
        prepared = self.store.prepare_round(**kwargs)  # type: ignore[arg-type]
        self._commits.append(self._writer.submit(self._write, prepared))

    def _write(self, prepared: PreparedRound) -> RoundRecord:
        """The writer thread's half: write the prepared round, then ``after_write``."""
        return self._written(self.store.write_round(prepared))

    def _written(self, record: RoundRecord) -> RoundRecord:
        if self.after_write is not None:
            self.after_write(record)
        return record

    def _raise_failed_commit(self) -> None:
        while self._commits and self._commits[0].done():
            self._committed(self._commits.pop(0).result())  # re-raises a failed commit

    def _committed(self, record: RoundRecord) -> None:
        self.committed_rounds += 1
        if self.on_commit is not None:
            self.on_commit(record)

    def flush(self) -> int:
        """Wait for every pending commit; raise the first that failed; return how many
        rounds this wrapper committed."""
        try:
            while self._commits:
                self._committed(self._commits.pop(0).result())
        finally:
            if self._writer is not None and not self._commits:
                self._writer.shutdown(wait=True)
                self._writer = None
        return self.committed_rounds

    def summary(self) -> None:  # noqa: D102
        self.strategy.summary()

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select clients by stable id, let the wrapped strategy build the messages,
        and give each client its own training seed."""
        t = server_round + self.round_offset
        self._raise_failed_commit()
        if self.refresh_exclude is not None:
            self.exclude = self.exclude | frozenset(self.refresh_exclude())
        selected = self.sampler.sample(t, self.roster, exclude=self.exclude)
        global_model = from_array_record(arrays)
        connected = [c for c in selected if c in self.clients]
        if not connected:  # every client drawn this round has withdrawn (or is offline)
            self._pending = _PendingRound(round=t, global_model=global_model,
                                          selected=selected, seeds={}, config={})
            return []
        view = _NodeSubsetGrid(grid, [self.clients[c] for c in connected])
        inner = list(self.strategy.configure_train(t, arrays, ConfigRecord(dict(config)), view))
        seeds: dict[str, int] = {}
        messages: list[Message] = []
        sent_config: dict[str, object] = {}
        extra = dict(self.extra_config()) if self.extra_config is not None else {}
        for msg in inner:
            cid = self._client_of_node[msg.metadata.dst_node_id]
            seeds[cid] = client_train_seed(self.run_seed, t, cid)
            content = RecordDict()
            for key, record in msg.content.items():
                if isinstance(record, ConfigRecord):
                    record = ConfigRecord(dict(record))
                    record["server-round"] = t
                    record[protocol.SEED] = seeds[cid]
                    sent_config = {k: v for k, v in record.items()
                                   if k not in protocol.UNRECORDED_CONFIG}
                    for extra_key, extra_value in extra.items():  # not recorded config
                        record[extra_key] = extra_value
                content[key] = record
            messages.append(
                Message(
                    content=content,
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=msg.metadata.message_type,
                    group_id=str(t),
                )
            )
        if len(messages) != sum(1 for c in selected if c in self.clients):
            raise RoundFailedError(
                f"round {t}: the wrapped strategy {type(self.strategy).__name__} built "
                f"{len(messages)} messages for {len(selected)} selected clients; it must "
                "train every node it is shown (fraction_train=1.0)"
            )
        self._pending = _PendingRound(
            round=t,
            global_model=global_model,
            selected=selected,
            seeds=seeds,
            config=sent_config,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, sort by client id, aggregate with the wrapped strategy, commit."""
        pending = self._pending
        t = server_round + self.round_offset
        if pending is None or pending.round != t:
            raise RoundFailedError(f"round {t}: aggregate_train without configure_train")
        accepted: dict[str, tuple[Message, TensorDict, int, dict[str, float]]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = self._client_of_node.get(node, f"<unknown node {node}>")
            self._take_ask(reply, cid, node)
            try:
                if cid not in pending.selected:
                    raise ClientReplyError("reply from a client not selected this round")
                local, n, metrics = check_train_reply(reply, cid, pending.global_model)
                if cid in accepted:
                    raise ClientReplyError("a second reply in the same round")
                if self.policy is not None:
                    local, n, metrics = self._screen(reply, cid, pending, local, n, metrics)
            except ClientReplyError as exc:
                log.warning("round %d: refused reply from client %s: %s", t, cid, exc)
                pending.refused.append(RefusedReply(client_id=cid, reason=str(exc)))
                continue
            accepted[cid] = (reply, local, n, metrics)
        for cid in pending.selected:
            if cid not in accepted and all(r.client_id != cid for r in pending.refused):
                reason = "no reply" if cid in self.clients else "not connected"
                pending.refused.append(RefusedReply(client_id=cid, reason=reason))
                log.warning("round %d: %s from client %s", t, reason, cid)
        if not pending.selected:
            # Nobody to train this round: the model stays as it was, and the (empty) round
            # is recorded so that round numbers keep their meaning across replays.
            return self._commit_unchanged(t, pending)
        needed = min(self.min_replies, len(pending.selected))
        if len(accepted) < max(needed, 1):
            reasons = "; ".join(
                f"{r.client_id}: {r.reason.splitlines()[0]}" for r in pending.refused
            )
            raise RoundFailedError(
                f"round {t}: {len(accepted)} valid replies of {len(pending.selected)} "
                f"selected, min-replies = {self.min_replies}; refused: {reasons or 'none'}"
            )
        order = sorted(accepted)
        agg_arrays: ArrayRecord | None
        agg_metrics: MetricRecord | None
        if _plain_fedavg_aggregation(self.strategy):
            # Flower's FedAvg arithmetic on the arrays already decoded and checked above
            # (same order, same float32 operations: bit-identical), instead of decoding
            # every reply a second time.
            agg_arrays, agg_metrics = self._fedavg_aggregate(
                [accepted[cid] for cid in order]
            )
        else:
            agg_arrays, agg_metrics = self.strategy.aggregate_train(
                t, [accepted[cid][0] for cid in order]
            )
        if agg_arrays is None:
            raise RoundFailedError(f"round {t}: the wrapped strategy aggregated nothing")
        total = sum(accepted[cid][2] for cid in order)
        participants = []
        for cid in order:
            _, local, n, metrics = accepted[cid]
            update = {k: local[k] - pending.global_model[k] for k in pending.global_model}
            participants.append(
                ParticipantUpdate(
                    client_id=cid,
                    num_examples=n,
                    weight=n / total,
                    seed=pending.seeds[cid],
                    update=update,
                    metrics=metrics,
                )
            )
        global_after = from_array_record(agg_arrays)
        global_before, self._global_digest = self._global_digest, tensors_digest(global_after)
        self._commit(
            round=t,
            global_before=global_before,
            global_after=global_after,
            participants=participants,
            refused=tuple(pending.refused),
            config=pending.config,
        )
        self._pending = None
        return agg_arrays, agg_metrics

    def _screen(self, reply: Message, cid: str, pending: _PendingRound, local: TensorDict,
                n: int, metrics: dict[str, float]) -> tuple[TensorDict, int, dict[str, float]]:
        """Apply the robust policy to one valid reply (ClientReplyError if it refuses)."""
        assert self.policy is not None
        verdict = screen_reply(pending.global_model, local, n, self.recorded_sizes.get(cid),
                               self.policy)
        if not verdict.accepted:
            raise ClientReplyError(verdict.reason)
        assert verdict.local_model is not None and verdict.num_examples is not None
        if verdict.reason:
            log.warning("round %d: client %s: %s", pending.round, cid, verdict.reason)
            # what the wrapped strategy aggregates from the reply, too
            for key, record in list(reply.content.items()):
                if isinstance(record, ArrayRecord):
                    reply.content[key] = to_array_record(verdict.local_model)
                elif isinstance(record, MetricRecord):
                    record["num-examples"] = verdict.num_examples
        return verdict.local_model, verdict.num_examples, {**metrics, **verdict.metrics}

    def _take_ask(self, reply: Message, cid: str, node: int) -> None:
        """Hand a withdrawal the reply carries to ``on_ask``; exclude the client from now."""
        if self.on_ask is None or not reply.has_content() or cid not in self.clients:
            return
        ask = protocol.read_ask(reply.content.get(CLIENT_RECORD), cid, node)
        if ask is not None and cid not in self.exclude:
            self.on_ask(ask)
            self.exclude = self.exclude | {cid}

    def _fedavg_aggregate(
        self, replies: list[tuple[Message, TensorDict, int, dict[str, float]]]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, on decoded
        arrays: Σ_k value_k · (n_k / Σ n), accumulated in reply order."""
        strategy = self.strategy
        assert isinstance(strategy, FedAvg)
        weights = [float(n) for _, _, n, _ in replies]
        total = sum(weights)
        aggregated: dict[str, np.ndarray] = {}
        for (_, local, _, _), weight in zip(replies, weights, strict=True):
            factor = weight / total
            for key, value in local.items():
                if key not in aggregated:
                    aggregated[key] = value * factor
                else:
                    aggregated[key] += value * factor
        metrics = strategy.train_metrics_aggr_fn(
            [msg.content for msg, _, _, _ in replies], strategy.weighted_by_key
        )
        return to_array_record(aggregated), metrics

    def _commit_unchanged(
        self, t: int, pending: _PendingRound
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        digest = self._global_digest
        self._commit(round=t, global_before=digest, global_after=pending.global_model,
                     participants=[], refused=tuple(pending.refused), config=pending.config)
        self._pending = None
        log.info("round %d: no client selected after exclusions; model unchanged", t)
        return to_array_record(pending.global_model), None

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on the clients' held-out data, in the chosen rounds only."""
        t = server_round + self.round_offset
        if self.evaluate_rounds is not None and t not in self.evaluate_rounds:
            return []
        nodes = [node for cid, node in sorted(self.clients.items()) if cid not in self.exclude]
        view = _NodeSubsetGrid(grid, nodes)
        return self.strategy.configure_evaluate(t, arrays, ConfigRecord(dict(config)), view)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation replies (in client-id order) with the wrapped strategy."""
        t = server_round + self.round_offset
        good = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                cid = self._client_of_node.get(r.metadata.src_node_id, "?")
                log.warning("round %d: evaluation failed on client %s", t, cid)
        good.sort(key=lambda r: self._client_of_node.get(r.metadata.src_node_id, ""))
        self.last_evaluation = {
            self._client_of_node.get(r.metadata.src_node_id, "?"): dict(
                next(iter(r.content.metric_records.values()))
            )
            for r in good
        }
        return self.strategy.aggregate_evaluate(t, good)

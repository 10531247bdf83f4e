"""The unlearning service: one withdrawal request, from its order to a signed receipt.

fedforget's own ServerApp, a user's ServerApp (through
:class:`fedforget.strategies.unlearnable.Unlearnable`) and the CLI (for methods that need
no client) all serve a request here. For the request the ledger ordered
(:meth:`fedforget.withdrawal.WithdrawalLedger.order`: method and parameters):

1. the forget set is every client withdrawn so far (a second withdrawal after a first
   forgets both: each result is "the model as if none of them had taken part"); a method
   that forgets one client per request (``multi_client = False``) forgets the requester
   only, starting from the model in service *before this request*. Record- and
   class-level requests (:mod:`fedforget.erasure`) forget no client: their scope — every
   record and class request in force — travels with the request, and only methods that
   serve that size (``request_kinds``) may serve them;
2. the method checks it can serve the request (retention, parameters, clients) before
   anything moves; the request goes ``→ unlearning``;
3. the method runs, through the same Grid and ClientApp as training (or on the server
   alone), into a hidden staging directory;
4. the retrained reference (same seeds and schedule, minus the forgotten clients) is
   computed once per forget set and cached in ``unlearned/reference-<key>/``, or reused,
   or skipped, as ``fedforget.reference`` says (``compute``, ``cached``, ``none``);
5. the app's :class:`~fedforget.measure.Measure` compares the models;
6. model, signed receipt and ``result.json`` (:class:`~fedforget.results.UnlearningOutcome`)
   are written into the staging directory, which is renamed into
   ``unlearned/<request>/<method>/`` — the commit; the receipt is then published in
   ``receipts/`` (the chain's head moves only onto a committed receipt), ``current.json``
   points at the model now in service, and the request goes to ``done``.

Any failure removes what was staged (and a result whose receipt could not be published)
and moves the request to ``failed`` with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedforget.arrays import TensorDict
from fedforget.environment import compute_environment, environment_differences
from fedforget.erasure import ErasureScope, add_client_records
from fedforget.errors import FedForgetError
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore
from fedforget.history.records import utc_now
from fedforget.measure import Measure, MeasureContext
from fedforget.progress import phase
from fedforget.receipts.issuer import (
    STAGED_RECEIPT,
    head_log,
    publish_receipt,
    sign_receipt,
    signing_key,
)
from fedforget.results import ReferenceInfo, ReferenceRecord, ResultError, UnlearningOutcome
from fedforget.rundir import (
    MODEL_FILE,
    PARTIAL_MARK,
    REPLAYED_HISTORY_DIR,
    RESULT_FILE,
    RunDirectory,
)
from fedforget.settings import DEFAULT_IMPACT_CLIENTS
from fedforget.tensors import decode, encode, sha256_digest
from fedforget.unlearning import Cost, UnlearningRequest, UnlearningResult, get_method
from fedforget.unlearning.base import (
    Federation,
    ServerSideTask,
    Unlearner,
    UnlearningError,
    first_contribution,
)
from fedforget.withdrawal import WithdrawalLedger, WithdrawalRequest, unknown_client_message

log = logging.getLogger("fedforget.server")

__all__ = [
    "OfflineFederation",
    "UnlearningService",
    "order_unlearning",
    "read_model",
    "write_model",
]


# --------------------------------------------------------------------- model files
def read_model(path: Path) -> TensorDict:
    """Read an encoded model file."""
    return decode(Path(path).read_bytes())


def write_model(path: Path, model: TensorDict) -> str:
    """Write ``model`` (fp32 canonical encoding); return its digest."""
    data = encode(model, "fp32")
    path.write_bytes(data)
    return sha256_digest(data)


def _stage(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    return partial


def _commit(partial: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


# ----------------------------------------------------------------- no federation
class OfflineFederation:
    """The federation as a method sees it when no client can be reached: the roster the
    run recorded, and no work (a server-side method needs none)."""

    def __init__(self, roster: tuple[str, ...], local_epochs: int = 1) -> None:
        self.roster = tuple(sorted(roster))
        self.local_epochs = local_epochs
        self.cost = Cost()

    def __getattr__(self, name: str) -> Any:
        raise UnlearningError(
            f"this unlearning runs without the federation (no app), so the method cannot "
            f"ask the clients for {name!r}"
        )


# ------------------------------------------------------------------- the service
@dataclass(frozen=True)
class _InService:
    model: TensorDict | None
    digest: str | None
    path: str | None


@dataclass(frozen=True)
class _Reference:
    model: TensorDict
    record: ReferenceRecord
    status: str  # "computed" or "cached"
    directory: Path

    @property
    def history(self) -> Path | None:
        return self.directory / self.record.history_dir if self.record.history_dir else None


class UnlearningService:
    """Serve withdrawal requests of one run directory.

    Parameters
    ----------
    run : RunDirectory
        The run.
    federation : Federation, optional
        The clients (a :class:`fedforget.federation.GridFederation`); None to run
        server-side methods without any client.
    measure : Measure
        How results are compared (see :mod:`fedforget.measure`).
    keys_dir : Path
        The server's signing keys.
    engine : str
        The engine the work runs on, as the result records it.
    reference : str
        ``compute``, ``cached`` or ``none`` (see the module).
    server_side : ServerSideTask, optional
        The model and proxy data the server holds, for server-side repairs (FUKD); None
        takes the measure's ``server_side`` attribute if it has one (fedforget's
        :class:`~fedforget.measure.TaskMeasure` does), else the server holds none.
    impact_clients : int
        Remaining clients asked for the per-client impact: a sample of this many, seeded by
        the run seed (0: every one; default 100).
    """

    def __init__(
        self,
        run: RunDirectory,
        *,
        federation: Federation | None,
        measure: Measure,
        keys_dir: Path,
        engine: str,
        reference: str = "compute",
        server_side: ServerSideTask | None = None,
        impact_clients: int = DEFAULT_IMPACT_CLIENTS,
    ) -> None:
        self.run = run
        # fedforget's TaskMeasure knows the task: its server side serves when none is given
        self.server_side = (server_side if server_side is not None
                            else getattr(measure, "server_side", None))
        self.federation = federation
        self.measure = measure
        self.keys_dir = keys_dir
        self.engine = engine
        self.reference_policy = reference
        self.impact_clients = impact_clients

    # ----------------------------------------------------------------- serving
    def serve(self, request_id: str | None = None) -> UnlearningOutcome:
        """Serve request ``request_id`` (default: the latest ordered) by its ordered method."""
        self._clean_partial()
        with HistoryStore.open(self.run.path) as store, WithdrawalLedger(self.run.path) as ledger:
            request = ledger.get(request_id) if request_id else ledger.latest_order()
            try:
                if not request.method:
                    raise UnlearningError(f"request {request.request_id} has no method ordered")
                method = get_method(request.method, request.params or {})
            except FedForgetError as exc:
                _fail(ledger, request, exc)
                self._sign(store)
                raise
            return self._serve(store, ledger, request, method)

    def _federation_for(self, store: HistoryStore) -> Federation:
        if self.federation is not None:
            return self.federation
        return OfflineFederation(store.roster())

    def _serve(self, store: HistoryStore, ledger: WithdrawalLedger, request: WithdrawalRequest,
               method: Unlearner[Any]) -> UnlearningOutcome:
        forget = forget_set(ledger, request, method)
        scope = ledger.scope()
        federation = self._federation_for(store)
        in_service = self._in_service(request)
        final = self.run.result_dir(request.request_id, method.name)
        partial = _stage(final)
        snapshots: list[tuple[int, TensorDict]] = []
        unlearning_request = UnlearningRequest(
            store=store, forget=forget, federation=federation, workdir=str(partial),
            current_model=in_service.model, observe=_keep_copies(snapshots),
            scope=scope, kind=request.kind,
            exclude=ledger.withdrawn() | forget,
            server_side=self.server_side,
        )
        committed = False
        staged = None
        latest_before = (self.run.latest_receipt.read_text()
                         if self.run.latest_receipt.exists() else None)
        try:
            if self.federation is None and method.uses_clients():
                raise UnlearningError(
                    f"{method.name} needs the clients; run it with the app "
                    "(fedforget unlearn ... --app DIR)"
                )
            method.check(unlearning_request)
            ledger.move(request.request_id, "unlearning", method=method.name)
            self._sign(store)
            if self.federation is not None and method.uses_clients():
                self._warm_up(store)
            want = "compute" if method.name == "retrain" else self.reference_policy
            # the reference and the measure cover every client withdrawn so far, also when
            # the method forgets one client per request (its result stands for them all)
            measured = forget if method.multi_client else forget | ledger.withdrawn()
            reference = self._reference(store, measured, want, scope)
            if method.name == "retrain" and reference is not None:
                result = UnlearningResult(model=reference.model, cost=reference.record.cost,
                                          rounds_affected=reference.record.rounds_affected,
                                          notes=list(reference.record.notes))
                replayed = reference.history
            else:
                with phase(f"{method.name}: forgetting {', '.join(sorted(forget))}",
                           enabled=bool(getattr(self.federation, "progress", False))):
                    result = method.unlearn(unlearning_request)
                replayed = Path(result.history_dir) if result.history_dir else None
            original = store.global_model(store.last_round)
            metrics = self.measure(MeasureContext(
                store=store, federation=self.federation, forget=measured,
                not_remaining=measured | ledger.withdrawn(), original=original,
                unlearned=result.model,
                retrained=reference.model if reference is not None else None,
                method_cost=result.cost,
                retrain_cost=reference.record.cost if reference is not None else None,
                trace=history_trace(replayed) if replayed is not None else snapshots,
                scope=scope, request=request,
                impact_clients=self.impact_clients,
                seed=_run_seed(store, self.federation),
                progress=bool(getattr(self.federation, "progress", False)),
            ))
            digest = write_model(partial / MODEL_FILE, result.model)
            environment = compute_environment()
            outcome = UnlearningOutcome(
                method=method.name,
                method_version=str(method.version),
                exact=method.exact,
                params=method.params.to_dict(),
                seed=_run_seed(store, self.federation),
                engine=self.engine,
                request_id=request.request_id,
                client_id=request.client_id,
                received_at=request.received_at,
                reason=request.reason,
                forgotten=sorted(forget),
                original_model_digest=store.model_digest(store.last_round),
                starting_model_digest=in_service.digest,
                model_path=self.run.relative(final / MODEL_FILE),
                model_digest=digest,
                reference=_reference_info(reference, digest),
                cost=result.cost,
                rounds_affected=list(result.rounds_affected),
                metrics=metrics,
                finished_at=utc_now(),
                notes=list(result.notes) + _environment_notes(reference, environment),
                history_dir=(self.run.relative(final / Path(result.history_dir)
                                               .relative_to(partial))
                             if result.history_dir else None),
                kind=request.kind,
                scope=scope.to_dict() if scope else None,
                environment=environment,
            )
            key, public_key = signing_key(self.run, self.keys_dir)
            staged = sign_receipt(run=self.run, store=store, outcome=outcome, key=key,
                                  public_key_path=public_key, staging=partial,
                                  request=request)
            outcome = outcome.with_receipt(staged.info)
            outcome.write(partial / RESULT_FILE)
            _commit(partial, final)
            committed = True
            publish_receipt(self.run, final / STAGED_RECEIPT, staged.info.receipt_id)
            self._put_in_service(request, outcome, in_service)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if committed:  # a result whose receipt is not published does not stand
                shutil.rmtree(final, ignore_errors=True)
            if staged is not None:  # nor does its receipt, nor the salts that open it
                self._withdraw_receipt(request.request_id, staged.info.receipt_id,
                                       latest_before)
            _fail(ledger, request, exc, method=method.name)
            self._sign(store)
            raise
        ledger.move(request.request_id, "done", method=method.name,
                    detail={"result": self.run.relative(final / RESULT_FILE)})
        self._sign(store)
        if not result.rounds_affected and not method.exact:
            log.warning("%s changed nothing: %s", method.name, "; ".join(result.notes))
        return outcome

    def _withdraw_receipt(self, request_id: str, receipt_id: str,
                          latest_before: str | None) -> None:
        """Undo what the receipt of a result that did not commit left: its published copy,
        the chain's head moved onto it, its salts in the outbox."""
        self.run.receipt(receipt_id).unlink(missing_ok=True)
        if latest_before is None:
            self.run.latest_receipt.unlink(missing_ok=True)
        elif self.run.latest_receipt.exists():
            write_atomic(self.run.latest_receipt, latest_before)
        for leftover in self.run.outbox(request_id).glob(f"{receipt_id}.*"):
            leftover.unlink(missing_ok=True)

    def _clean_partial(self) -> None:
        """Remove the staging directories a killed command left (this command holds the
        run's lock: no other writer is staging now)."""
        for leftover in self.run.partial_dirs():
            log.warning("removing %s, left by an interrupted command", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def _sign(self, store: HistoryStore) -> None:
        """Sign a head over the store and the ledger as they are now (every ledger change
        is covered by a signed head)."""
        head_log(store, self.run, self.keys_dir)

    # ------------------------------------------------------------ in service
    def _in_service(self, request: WithdrawalRequest) -> _InService:
        """The model in service *before* ``request`` (None: the trained model)."""
        if not self.run.current.exists():
            return _InService(None, None, None)
        info = json.loads(self.run.current.read_text())
        if info.get("request_id") == request.request_id:
            info = info.get("before") or {}
        if not info.get("model_path"):
            return _InService(None, None, None)
        return _InService(read_model(self.run.path / info["model_path"]),
                          str(info["model_digest"]), str(info["model_path"]))

    def _put_in_service(self, request: WithdrawalRequest, outcome: UnlearningOutcome,
                        before: _InService) -> None:
        write_atomic(self.run.current, json.dumps({
            "request_id": request.request_id, "method": outcome.method,
            "model_path": outcome.model_path, "model_digest": outcome.model_digest,
            "before": ({"model_path": before.path, "model_digest": before.digest}
                       if before.path is not None else None),
        }, indent=2, sort_keys=True))

    # ------------------------------------------------------------- reference
    def _reference(self, store: HistoryStore, forget: frozenset[str], want: str,
                   scope: ErasureScope | None = None) -> _Reference | None:
        """The retrained model without ``forget`` (and the records and classes of
        ``scope``): cached, or computed (``compute``) and cached, or None (``none``, or
        ``cached`` with nothing cached)."""
        if want == "none":
            return None
        scope = scope or ErasureScope()
        final = self.run.reference_dir(forget | scope.tokens())
        last = store.last_round
        original = store.model_digest(last)
        if (final / RESULT_FILE).exists():
            record = ReferenceRecord.read(final / RESULT_FILE)
            if record.valid_for(rounds=last, original_model_digest=original):
                model = read_model(final / record.model_path)
                if sha256_digest(encode(model, "fp32")) != record.model_digest:
                    raise ResultError(f"{final / record.model_path} does not match the "
                                      f"digest {record.model_digest} its reference record "
                                      "states")
                return _Reference(model, record, "cached", final)
            log.warning("the cached reference in %s was retrained from another history "
                        "(%s rounds, now %d): %s", final, record.trained_rounds
                        or max(record.rounds_affected, default=0), last,
                        "retraining it" if want == "compute" and self.federation is not None
                        else "not used")
        if want == "cached" or self.federation is None:
            return None
        partial = _stage(final)
        try:
            with phase(f"reference: retraining {last} rounds without {', '.join(sorted(forget))}",
                       enabled=bool(getattr(self.federation, "progress", False))):
                result = get_method("retrain").unlearn(UnlearningRequest(
                    store=store, forget=forget, federation=self.federation,
                    workdir=str(partial), scope=scope))
            digest = write_model(partial / MODEL_FILE, result.model)
            record = ReferenceRecord(
                forgotten=sorted(forget), model_path=MODEL_FILE, model_digest=digest,
                cost=result.cost, rounds_affected=list(result.rounds_affected),
                history_dir=REPLAYED_HISTORY_DIR if result.history_dir else None,
                notes=list(result.notes), scope=scope.to_dict() if scope else None,
                trained_rounds=last, original_model_digest=original,
                environment=compute_environment())
            record.write(partial / RESULT_FILE)
            _commit(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        # The method shares the federation's cost counter: the reference is not its cost.
        self.federation.cost = Cost()
        return _Reference(result.model, record, "computed", final)

    def _warm_up(self, store: HistoryStore) -> None:
        """One untimed, uncounted client step, so that one-off start-up costs (imports, the
        first backward pass, data loading) fall on no method's wall time."""
        federation = self.federation
        assert federation is not None
        some = sorted(federation.roster)[:1]
        if some:
            saved = federation.cost  # train() adds to the object in place: count into
            federation.cost = Cost()  # a scratch one
            federation.train(server_round=0, global_model=store.global_model(0), clients=some)
            federation.cost = saved


def forget_set(ledger: WithdrawalLedger, request: WithdrawalRequest,
               method: Unlearner[Any]) -> frozenset[str]:
    """The clients a result forgets: every client withdrawn so far and the requester (a
    whole-client request), or the requester alone (a method that forgets one client per
    request); for a record or class request, the clients withdrawn so far."""
    if request.kind != "client":
        return ledger.withdrawn() if method.multi_client else frozenset()
    if method.multi_client:
        return ledger.withdrawn() | {request.client_id}
    return frozenset({request.client_id})


def _reference_info(reference: _Reference | None, digest: str) -> ReferenceInfo:
    if reference is None:
        return ReferenceInfo(status="none")
    return ReferenceInfo(status=reference.status, model_digest=reference.record.model_digest,
                         cost=reference.record.cost,
                         bit_identical=digest == reference.record.model_digest)


def _environment_notes(reference: _Reference | None, now: dict[str, str]) -> list[str]:
    """A note when the cached reference was retrained under other kernels or versions
    than this result was computed under: then bit identity with it is not to be expected
    even of an exact method."""
    if reference is None:
        return []
    changed = environment_differences(reference.record.environment, now)
    if not changed:
        return []
    return [f"the cached reference ({reference.directory}) was retrained in another environment "
            f"({'; '.join(changed)}): a model computed here need not match it bit for bit, "
            "even by an exact method (fedforget.environment says how to choose the kernels)"]


def _run_seed(store: HistoryStore, federation: Federation | None) -> int:
    settings = getattr(federation, "settings", None)
    if settings is not None:
        return int(settings.seed)
    return int(store.recording.get("seed", 0))


def _fail(ledger: WithdrawalLedger, request: WithdrawalRequest, exc: BaseException,
          *, method: str | None = None) -> None:
    """Move ``request`` to ``failed`` with the reason (never hiding the original error).

    A request already ``done`` (served by an earlier method; another method serving it
    again failed) stays ``done``: the committed result it has is still there."""
    try:
        current = ledger.get(request.request_id)
        if current.state == "done":
            log.warning("request %s stays done (its committed result stands); serving it "
                        "again with %s failed: %s", request.request_id, method or "a method",
                        exc)
            return
        if current.state == "pending":
            ledger.move(request.request_id, "unlearning", method=method)
        ledger.move(request.request_id, "failed", method=method,
                    detail={"error": f"{type(exc).__name__}: {exc}"})
    except Exception as second:  # noqa: BLE001 - the first error is the one to report
        log.error("could not record the failure of %s: %s", request.request_id, second)


def _keep_copies(snapshots: list[tuple[int, TensorDict]]
                 ) -> Callable[[int, Mapping[str, np.ndarray]], None]:
    """An observer that keeps a copy of every model it is handed (evaluated later)."""
    def observe(server_round: int, model: Mapping[str, np.ndarray]) -> None:
        snapshots.append((server_round, {k: np.array(v, copy=True) for k, v in model.items()}))
    return observe


def history_trace(directory: Path) -> list[tuple[int, TensorDict]]:
    """The global models of a replayed history, rounds ``1..T``, as ``(round, model)``.

    Retrain's history holds every round it replayed; rollback's holds the rounds before
    :math:`t_0` forked from the original history (its models, unchanged) and the rounds it
    replayed, so both traces cover rounds ``1..T``.
    """
    with HistoryStore.open(directory, fsync=False) as history:
        return [(t, history.global_model(t)) for t in range(1, history.last_round + 1)]


# ------------------------------------------------------------ ordering (the CLI)
def order_unlearning(
    run: RunDirectory,
    *,
    client: str,
    method: str,
    params: Mapping[str, Any] | None = None,
    reason: str = "",
    records: Collection[str] | None = None,
    labels: Collection[int] | None = None,
    keys_dir: Path | None = None,
) -> WithdrawalRequest | None:
    """Record ``client``'s withdrawal (or reuse it) and order it served by ``method``.

    With ``records``, the request is for those records of ``client`` only (it stays):
    a new record-level request, whose ids are also written to the client's state
    directory (in simulation, ``<run>/client-state/<client>/``; :mod:`fedforget.erasure`).
    With ``labels``, the request is for every example of those labels on every client,
    asked by ``client`` (any name: the operator or a policy).

    Everything that can be refused is refused before anything is written: an unknown
    client, an unknown method, a parameter out of range, a history whose retention dropped
    what the method needs, a method that does not serve that size of request, records the
    client does not hold (checked when the run is fedforget's own task). A client with no
    stored contribution is a no-op (``None``, nothing written).
    """
    if records is not None and labels is not None:
        raise UnlearningError("a request names records or labels, not both")
    if records is not None or labels is not None:
        return _order_erasure(run, client=client, method=method, params=params,
                              reason=reason, records=records, labels=labels, keys_dir=keys_dir)
    unlearner = get_method(method, params or {})
    with HistoryStore.open(run.path) as store:
        roster = frozenset(store.roster())
        if client not in roster:
            raise UnlearningError(unknown_client_message(client, roster))
        if first_contribution(store, [client]) is None:
            return None
        with WithdrawalLedger(run.path) as ledger:
            earlier = ledger.withdrawn()
        forget = (earlier | {client}) if unlearner.multi_client else frozenset({client})
        unlearner.check(UnlearningRequest(store=store, forget=forget,
                                          federation=OfflineFederation(tuple(roster)),
                                          workdir=""))
    with HistoryStore.open(run.path) as store, WithdrawalLedger(run.path) as ledger:
        request, _ = ledger.request(client, reason=reason or "unlearn command", roster=roster)
        ordered = ledger.order(request.request_id, method=unlearner.name,
                               params=unlearner.params.to_dict())
        head_log(store, run, keys_dir)
        return ordered


def _order_erasure(run: RunDirectory, *, client: str, method: str,
                   params: Mapping[str, Any] | None, reason: str,
                   records: Collection[str] | None, labels: Collection[int] | None,
                   keys_dir: Path | None = None) -> WithdrawalRequest:
    """:func:`order_unlearning` for a record- or class-level request."""
    from fedforget.erasure import parse_record_ids

    unlearner = get_method(method, params or {})
    kind = "records" if records is not None else "class"
    if kind not in unlearner.request_kinds:
        raise UnlearningError(
            f"{unlearner.name} serves {', '.join(unlearner.request_kinds)} requests, not "
            f"{kind} requests; use retrain or rollback (exact), or a method made for them"
        )
    with HistoryStore.open(run.path) as store:
        roster = frozenset(store.roster())
        ids = parse_record_ids(records) if records is not None else []
        num_classes = _check_task_scope(store, client, ids, labels)
        with WithdrawalLedger(run.path) as ledger:
            withdrawn = ledger.withdrawn()
            scope = ledger.scope()
        if kind == "records":
            scope = scope.merge(ErasureScope(records={client: frozenset(ids)}))
            if client not in roster:
                raise UnlearningError(unknown_client_message(client, roster))
        else:
            scope = scope.merge(ErasureScope(labels=frozenset(int(v) for v in labels or ())))
        unlearner.check(UnlearningRequest(
            store=store, forget=withdrawn if unlearner.multi_client else frozenset(),
            federation=OfflineFederation(tuple(roster)), workdir="", scope=scope, kind=kind))
    with WithdrawalLedger(run.path) as ledger:
        if kind == "records":
            request = ledger.request_records(client, ids, reason=reason or "unlearn command",
                                             roster=roster)
            add_client_records(run.client_state(client), request.request_id, ids)
        else:
            request = ledger.request_class(labels or (), requester=client,
                                           reason=reason or "unlearn command",
                                           num_classes=num_classes)
        ordered = ledger.order(request.request_id, method=unlearner.name,
                               params=unlearner.params.to_dict())
    with HistoryStore.open(run.path) as store:
        head_log(store, run, keys_dir)
    return ordered


def _check_task_scope(store: HistoryStore, client: str, ids: list[str],
                      labels: Collection[int] | None) -> int | None:
    """When the run is fedforget's own task, refuse record ids the client does not train
    on and labels the task does not have; return the task's number of classes (None for
    another app, whose clients check for themselves)."""
    from fedforget.config import RunConfig
    from fedforget.errors import ConfigError

    try:
        cfg = RunConfig.from_mapping(store.run_config)
    except ConfigError:
        return None
    from fedforget.task import client_partition, load_client_data, load_test_set

    num_classes = load_test_set(cfg).num_classes
    if ids:
        partition = client_partition(client)
        if partition is None or partition >= cfg.num_clients:
            return num_classes
        train, _ = load_client_data(cfg, partition)
        held = set(train.record_ids())
        unknown = [i for i in ids if i not in held]
        if unknown:
            raise UnlearningError(
                f"record {unknown[0]} is not one of {client}'s training records "
                f"({len(unknown)} of the {len(ids)} ids are not); expected ids of the "
                "records it trains on"
            )
    if labels is not None:
        bad = [v for v in labels if not 0 <= int(v) < num_classes]
        if bad:
            raise UnlearningError(f"label {bad[0]!r} is not a class of this task; expected "
                                  f"0..{num_classes - 1}")
    return num_classes

"""The unlearning service: one withdrawal request, from its order to a signed receipt.

fedforget's own ServerApp, a user's ServerApp (through
:class:`fedforget.strategies.unlearnable.Unlearnable`) and the CLI (for methods that need
no client) all serve a request here. For the request the ledger ordered
(:meth:`fedforget.withdrawal.WithdrawalLedger.order`: method and parameters):

1. the forget set is every client withdrawn so far (a second withdrawal after a first
   forgets both: each result is "the model as if none of them had taken part"); a method
   that forgets one client per request (``multi_client = False``) forgets the requester
   only, starting from the model in service *before this request*;
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedforget.arrays import TensorDict
from fedforget.errors import FedForgetError
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore
from fedforget.history.records import utc_now
from fedforget.measure import Measure, MeasureContext
from fedforget.progress import phase
from fedforget.receipts.issuer import STAGED_RECEIPT, publish_receipt, sign_receipt, signing_key
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
from fedforget.unlearning.base import Federation, Unlearner, UnlearningError, first_contribution
from fedforget.withdrawal import WithdrawalLedger, WithdrawalRequest

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
        impact_clients: int = DEFAULT_IMPACT_CLIENTS,
    ) -> None:
        self.run = run
        self.federation = federation
        self.measure = measure
        self.keys_dir = keys_dir
        self.engine = engine
        self.reference_policy = reference
        self.impact_clients = impact_clients

    # ----------------------------------------------------------------- serving
    def serve(self, request_id: str | None = None) -> UnlearningOutcome:
        """Serve request ``request_id`` (default: the latest ordered) by its ordered method."""
        with HistoryStore.open(self.run.path) as store, WithdrawalLedger(self.run.path) as ledger:
            request = ledger.get(request_id) if request_id else ledger.latest_order()
            try:
                if not request.method:
                    raise UnlearningError(f"request {request.request_id} has no method ordered")
                method = get_method(request.method, request.params or {})
            except FedForgetError as exc:
                _fail(ledger, request, exc)
                raise
            return self._serve(store, ledger, request, method)

    def _federation_for(self, store: HistoryStore) -> Federation:
        if self.federation is not None:
            return self.federation
        return OfflineFederation(store.roster())

    def _serve(self, store: HistoryStore, ledger: WithdrawalLedger, request: WithdrawalRequest,
               method: Unlearner[Any]) -> UnlearningOutcome:
        forget = (ledger.withdrawn() | {request.client_id} if method.multi_client
                  else frozenset({request.client_id}))
        federation = self._federation_for(store)
        in_service = self._in_service(request)
        final = self.run.result_dir(request.request_id, method.name)
        partial = _stage(final)
        snapshots: list[tuple[int, TensorDict]] = []
        unlearning_request = UnlearningRequest(
            store=store, forget=forget, federation=federation, workdir=str(partial),
            current_model=in_service.model, observe=_keep_copies(snapshots),
        )
        committed = False
        try:
            if self.federation is None and method.uses_clients():
                raise UnlearningError(
                    f"{method.name} needs the clients; run it with the app "
                    "(fedforget unlearn ... --app DIR)"
                )
            method.check(unlearning_request)
            ledger.move(request.request_id, "unlearning", method=method.name)
            if self.federation is not None and method.uses_clients():
                self._warm_up(store)
            want = "compute" if method.name == "retrain" else self.reference_policy
            reference = self._reference(store, forget, want)
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
                store=store, federation=self.federation, forget=forget,
                not_remaining=forget | ledger.withdrawn(), original=original,
                unlearned=result.model,
                retrained=reference.model if reference is not None else None,
                method_cost=result.cost,
                retrain_cost=reference.record.cost if reference is not None else None,
                trace=history_trace(replayed) if replayed is not None else snapshots,
                impact_clients=self.impact_clients,
                seed=_run_seed(store, self.federation),
                progress=bool(getattr(self.federation, "progress", False)),
            ))
            digest = write_model(partial / MODEL_FILE, result.model)
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
                notes=list(result.notes),
                history_dir=(self.run.relative(final / Path(result.history_dir)
                                               .relative_to(partial))
                             if result.history_dir else None),
            )
            key, public_key = signing_key(self.keys_dir)
            staged = sign_receipt(run=self.run, store=store, outcome=outcome, key=key,
                                  public_key_path=public_key, staging=partial)
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
            _fail(ledger, request, exc, method=method.name)
            raise
        ledger.move(request.request_id, "done", method=method.name,
                    detail={"result": self.run.relative(final / RESULT_FILE)})
        if not result.rounds_affected and not method.exact:
            log.warning("%s changed nothing: %s", method.name, "; ".join(result.notes))
        return outcome

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
    def _reference(self, store: HistoryStore, forget: frozenset[str], want: str
                   ) -> _Reference | None:
        """The retrained model without ``forget``: cached, or computed (``compute``) and
        cached, or None (``none``, or ``cached`` with nothing cached)."""
        if want == "none":
            return None
        final = self.run.reference_dir(forget)
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
                    workdir=str(partial)))
            digest = write_model(partial / MODEL_FILE, result.model)
            record = ReferenceRecord(
                forgotten=sorted(forget), model_path=MODEL_FILE, model_digest=digest,
                cost=result.cost, rounds_affected=list(result.rounds_affected),
                history_dir=REPLAYED_HISTORY_DIR if result.history_dir else None,
                notes=list(result.notes), trained_rounds=last,
                original_model_digest=original)
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
            saved = federation.cost
            federation.train(server_round=0, global_model=store.global_model(0), clients=some)
            federation.cost = saved


def _reference_info(reference: _Reference | None, digest: str) -> ReferenceInfo:
    if reference is None:
        return ReferenceInfo(status="none")
    return ReferenceInfo(status=reference.status, model_digest=reference.record.model_digest,
                         cost=reference.record.cost,
                         bit_identical=digest == reference.record.model_digest)


def _run_seed(store: HistoryStore, federation: Federation | None) -> int:
    settings = getattr(federation, "settings", None)
    if settings is not None:
        return int(settings.seed)
    return int(store.recording.get("seed", 0))


def _fail(ledger: WithdrawalLedger, request: WithdrawalRequest, exc: BaseException,
          *, method: str | None = None) -> None:
    """Move ``request`` to ``failed`` with the reason (never hiding the original error)."""
    try:
        current = ledger.get(request.request_id)
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
) -> WithdrawalRequest | None:
    """Record ``client``'s withdrawal (or reuse it) and order it served by ``method``.

    Everything that can be refused is refused before anything is written: an unknown
    client, an unknown method, a parameter out of range, a history whose retention dropped
    what the method needs. A client with no stored contribution is a no-op (``None``,
    nothing written).
    """
    unlearner = get_method(method, params or {})
    with HistoryStore.open(run.path) as store:
        roster = frozenset(store.roster())
        if client not in roster:
            raise UnlearningError(
                f"unknown client {client!r}: this run's clients are "
                f"{', '.join(sorted(roster)) or 'none'}"
            )
        if first_contribution(store, [client]) is None:
            return None
        with WithdrawalLedger(run.path) as ledger:
            earlier = ledger.withdrawn()
        forget = (earlier | {client}) if unlearner.multi_client else frozenset({client})
        unlearner.check(UnlearningRequest(store=store, forget=forget,
                                          federation=OfflineFederation(tuple(roster)),
                                          workdir=""))
    with WithdrawalLedger(run.path) as ledger:
        request, _ = ledger.request(client, reason=reason or "unlearn command", roster=roster)
        return ledger.order(request.request_id, method=unlearner.name,
                            params=unlearner.params.to_dict())

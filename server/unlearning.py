"""Serving a withdrawal request: run an unlearning method, compare, write the result.

For request ``request-id`` with ``method``:

1. the forget set is every client that has withdrawn so far (a second withdrawal after a
   first one forgets both: each result is "the model as if none of them had taken part");
   a method that forgets one client per request (``multi_client = False``) forgets only the
   requester, starting from the model in service;
2. the method checks it can serve the request (retention, parameters) before anything moves;
3. the request goes ``pending → unlearning``; the method runs, through the same Grid and
   ClientApp as training;
4. the retrained reference (same seeds and schedule, minus the forgotten clients) is
   computed once per forget set and cached in ``unlearned/reference-<key>/``; the three
   models (original, unlearned, retrained) are compared by the whole evaluation protocol
   (:func:`measure`);
5. a signed erasure receipt is written to ``receipts/<receipt-id>.json`` (the salt of the
   client commitment goes to the client's own state directory);
6. the result is written atomically to ``unlearned/<request-id>/<method>/`` (``model.fft``
   and ``result.json``), ``unlearned/current.json`` points at the model now in service, and
   the request goes to ``done`` (or ``failed``, with the error, if anything raised).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedforget.comparison import speedups
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset
from fedforget.evaluation import accuracy_trace, evaluate_unlearning, run_shadow_attack
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore
from fedforget.history.records import utc_now
from fedforget.task import TensorDict, load_client_data, load_test_set, new_model
from fedforget.tensors import decode, encode, sha256_digest
from fedforget.unlearning import Cost, UnlearningRequest, UnlearningResult, get_method
from fedforget.unlearning.base import Unlearner, UnlearningError
from fedforget.withdrawal import WithdrawalLedger, WithdrawalRequest
from server.app import check_same_training
from server.federation import GridFederation, identify_clients
from server.receipts import issue_receipt, saved_head_of

log = logging.getLogger("fedforget.server")

UNLEARNED = "unlearned"
MODEL_FILE = "model.fft"
RESULT_FILE = "result.json"


def forget_set(method: Unlearner, ledger: WithdrawalLedger, request: WithdrawalRequest
               ) -> frozenset[str]:
    """The clients this run forgets (cumulative, unless the method forgets one at a time)."""
    if not method.multi_client:
        return frozenset({request.client_id})
    return ledger.withdrawn() | {request.client_id}


def current_model(out: Path) -> tuple[TensorDict | None, str | None]:
    """The model in service after the latest unlearning (None: the trained model)."""
    pointer = out / UNLEARNED / "current.json"
    if not pointer.exists():
        return None, None
    info = json.loads(pointer.read_text())
    return read_model(out / info["model_path"]), str(info["model_digest"])


def read_model(path: Path) -> TensorDict:
    """Read an encoded model file."""
    return decode(path.read_bytes())


def write_model(path: Path, model: TensorDict) -> str:
    """Write ``model`` (fp32 canonical encoding); return its digest."""
    data = encode(model, "fp32")
    path.write_bytes(data)
    return sha256_digest(data)


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    return partial


def _commit_dir(partial: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


def _json_ready(result: UnlearningResult, final: Path, partial: Path) -> dict[str, Any]:
    history = None
    if result.history_dir:
        history = str(Path(result.history_dir).relative_to(partial))
    return {
        "cost": result.cost.to_dict(),
        "rounds_affected": result.rounds_affected,
        "notes": result.notes,
        "history_dir": history,
    }


def _partition_of(client_id: str) -> int | None:
    match = re.fullmatch(r"client-(\d+)", client_id)
    return int(match.group(1)) if match else None


def reference(
    grid: Grid, cfg: RunConfig, store: HistoryStore, clients: dict[str, int],
    forget: frozenset[str], out: Path,
) -> tuple[TensorDict, Cost, str, Path | None]:
    """The retrained model without ``forget`` (cached per forget set); model, cost, digest
    and the directory of its replayed history."""
    key = hashlib.sha256("\n".join(sorted(forget)).encode()).hexdigest()[:12]
    final = out / UNLEARNED / f"reference-{key}"
    if (final / RESULT_FILE).exists():
        info = json.loads((final / RESULT_FILE).read_text())
        history = final / info["history_dir"] if info.get("history_dir") else None
        return (read_model(final / MODEL_FILE), Cost(**info["cost"]), str(info["model_digest"]),
                history)
    partial = _atomic_dir(final)
    try:
        federation = GridFederation(grid, cfg, clients)
        result = get_method("retrain").unlearn(
            UnlearningRequest(store=store, forget=forget, federation=federation,
                              workdir=str(partial))
        )
        digest = write_model(partial / MODEL_FILE, result.model)
        info = {"forgotten": sorted(forget), "model_digest": digest, "model_path": MODEL_FILE,
                **_json_ready(result, final, partial)}
        (partial / RESULT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        _commit_dir(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    history = final / info["history_dir"] if info.get("history_dir") else None
    return result.model, result.cost, digest, history


def _warm_up(grid: Grid, cfg: RunConfig, clients: dict[str, int], store: HistoryStore) -> None:
    """One untimed, uncounted client step, so that one-off start-up costs (imports, the
    first backward pass, data loading) fall on no method's wall time."""
    some = sorted(clients)[:1]
    if some:
        GridFederation(grid, cfg, clients).train(
            server_round=0, global_model=store.global_model(0), clients=some, local_epochs=1
        )


def forgotten_data(cfg: RunConfig, forget: Collection[str]
                   ) -> tuple[ArrayDataset | None, ArrayDataset | None]:
    """The forgotten clients' training data and their held-out data, each pooled.

    Members and non-members of the membership attacks: the same clients, the same
    distribution, only the training split was trained on. None where there is no example
    (a client id that names no partition of this run).
    """
    splits = [load_client_data(cfg, partition) for partition in
              (_partition_of(cid) for cid in sorted(forget))
              if partition is not None and partition < cfg.num_clients]
    return (_pooled([train for train, _ in splits], "forgotten"),
            _pooled([held for _, held in splits], "forgotten-holdout"))


def _pooled(parts: list[ArrayDataset], name: str) -> ArrayDataset | None:
    parts = [d for d in parts if len(d)]
    if not parts:
        return None
    return ArrayDataset(x=np.concatenate([d.x for d in parts]),
                        y=np.concatenate([d.y for d in parts]),
                        num_classes=parts[0].num_classes, name=name)


def history_trace(directory: Path) -> list[tuple[int, TensorDict]]:
    """The global models of a replayed history, rounds ``1..T``, as ``(round, model)``.

    Retrain's history holds every round it replayed; rollback's holds the rounds before
    :math:`t_0` forked from the original history (its models, unchanged) and the rounds
    it replayed, so both traces cover rounds ``1..T``.
    """
    with HistoryStore.open(directory, fsync=False) as history:
        return [(t, history.global_model(t)) for t in range(1, history.last_round + 1)]


def measure(
    *,
    cfg: RunConfig,
    store: HistoryStore,
    federation: GridFederation,
    forget: frozenset[str],
    not_remaining: Collection[str],
    original: TensorDict,
    unlearned: TensorDict,
    retrained: TensorDict,
    method_cost: Cost,
    retrain_cost: Cost,
    trace: list[tuple[int, TensorDict]],
) -> dict[str, Any]:
    """``result.json["metrics"]``: the protocol's figures, speed-ups, storage and trace.

    * the model-comparison figures of :func:`fedforget.evaluation.evaluate_unlearning`:
      forgotten data and membership attacks on the forgotten clients' training data
      (members) against their held-out data (non-members), the shadow attack of
      :func:`fedforget.evaluation.run_shadow_attack`, the backdoor when a forgotten client
      planted one, and each remaining client's held-out accuracy under the original and
      the unlearned model, asked of the clients through the federation (EVALUATE
      messages, no cost counted) — the remaining clients are the federation's roster
      minus ``not_remaining``; clients that do not answer for both models are left out;
    * ``speedup_wall``, ``speedup_client_epochs`` (:func:`fedforget.comparison.speedups`);
    * ``storage_bytes``: the bytes of the history store (all its blobs);
    * ``trace``: ``[{"round", "test_accuracy"}]`` of ``trace``'s models on the test set.
    """
    test_set = load_test_set(cfg)
    members, non_members = forgotten_data(cfg, forget)
    remaining = [cid for cid in federation.roster if cid not in not_remaining]
    before: Mapping[str, float] | None = None
    after: Mapping[str, float] | None = None
    if remaining:
        asked_before = federation.evaluate_local(original, remaining)
        asked_after = federation.evaluate_local(unlearned, remaining)
        answered = sorted(set(asked_before) & set(asked_after))
        if answered:
            before = {cid: asked_before[cid] for cid in answered}
            after = {cid: asked_after[cid] for cid in answered}
    scratch = new_model(cfg)
    shadow = (run_shadow_attack(cfg, test_set)
              if members is not None and non_members is not None else None)
    figures = evaluate_unlearning(
        model=scratch, original=original, unlearned=unlearned, retrained=retrained,
        test_set=test_set, forgotten=members, holdout=non_members,
        backdoor_target=cfg.backdoor_target if forget & cfg.backdoor_client_ids() else None,
        shadow=shadow, client_accuracy_before=before, client_accuracy_after=after,
    )
    return {
        **figures,
        **speedups(method_cost, retrain_cost),
        "storage_bytes": int(store.summary()["bytes_stored"]),
        "trace": accuracy_trace(scratch, trace, test_set),
    }


def _keep_copies(snapshots: list[tuple[int, TensorDict]]
                 ) -> Callable[[int, Mapping[str, np.ndarray]], None]:
    """An observer that keeps a copy of every model it is handed (evaluated later)."""
    def observe(server_round: int, model: Mapping[str, np.ndarray]) -> None:
        snapshots.append((server_round, {k: np.array(v, copy=True) for k, v in model.items()}))
    return observe


def serve_withdrawal(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Serve the withdrawal request ``cfg.request_id`` with ``cfg.method``."""
    out = Path(cfg.out_dir)
    store = HistoryStore.open(out)
    try:
        check_same_training(store, cfg)
        with WithdrawalLedger(out) as ledger:
            return _serve(grid, cfg, store, ledger, out)
    finally:
        store.close()


def _serve(grid: Grid, cfg: RunConfig, store: HistoryStore, ledger: WithdrawalLedger,
           out: Path) -> dict[str, Any]:
    request = ledger.get(cfg.request_id)
    params = json.loads(cfg.method_params) if cfg.method_params else {}
    method = get_method(cfg.method, params)
    forget = forget_set(method, ledger, request)
    roster = set(store.roster())
    clients = identify_clients(grid, max(1, len(roster) - len(forget)))
    federation = GridFederation(grid, cfg, clients)
    in_service, in_service_digest = current_model(out)
    final = out / UNLEARNED / request.request_id / method.name
    partial = _atomic_dir(final)
    snapshots: list[tuple[int, TensorDict]] = []
    unlearning_request = UnlearningRequest(
        store=store, forget=forget, federation=federation, workdir=str(partial),
        current_model=in_service, observe=_keep_copies(snapshots),
    )
    try:
        method.check(unlearning_request)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    ledger.move(request.request_id, "unlearning", method=method.name)
    _warm_up(grid, cfg, clients, store)
    try:
        retrained, retrain_cost, retrained_digest, reference_history = reference(
            grid, cfg, store, clients, forget, out
        )
        replayed = None  # the history a method replayed, if it wrote one
        if method.name == "retrain":  # the reference is this method's result
            result = UnlearningResult(model=retrained, cost=retrain_cost,
                                      rounds_affected=list(range(1, store.last_round + 1)))
            replayed = reference_history
        else:
            result = method.unlearn(unlearning_request)
            replayed = Path(result.history_dir) if result.history_dir else None
        metrics = measure(
            cfg=cfg, store=store, federation=federation, forget=forget,
            not_remaining=forget | ledger.withdrawn(),
            original=store.global_model(store.last_round), unlearned=result.model,
            retrained=retrained, method_cost=result.cost, retrain_cost=retrain_cost,
            trace=history_trace(replayed) if replayed is not None else snapshots,
        )
        digest = write_model(partial / MODEL_FILE, result.model)
        info: dict[str, Any] = {
            "method": method.name,
            "method_version": method.version,
            "exact": method.exact,
            "params": method.params.to_dict(),
            "seed": cfg.seed,
            "request": request.to_dict() | {"state": "done"},
            "forgotten": sorted(forget),
            "original_model_digest": store.model_digest(store.last_round),
            "starting_model_digest": in_service_digest,
            "model_path": str(Path(UNLEARNED) / request.request_id / method.name / MODEL_FILE),
            "model_digest": digest,
            "reference": {
                "model_digest": retrained_digest,
                "cost": retrain_cost.to_dict(),
                "bit_identical": digest == retrained_digest,
            },
            "metrics": metrics,
            "finished_at": utc_now(),
            **_json_ready(result, final, partial),
        }
        saved_head, head_path = saved_head_of(out, request.request_id, request.client_id)
        info["receipt"] = issue_receipt(cfg=cfg, store=store, info=info,
                                        client_id=request.client_id, saved_head=saved_head)
        info["receipt"]["head_path"] = str(head_path) if head_path is not None else None
        (partial / RESULT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        _commit_dir(partial, final)
        write_atomic(out / UNLEARNED / "current.json",
                     json.dumps({"request_id": request.request_id, "method": method.name,
                                 "model_path": info["model_path"], "model_digest": digest}))
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        ledger.move(request.request_id, "failed", method=method.name,
                    detail={"error": f"{type(exc).__name__}: {exc}"})
        raise
    ledger.move(request.request_id, "done", method=method.name,
                detail={"result": str(final.relative_to(out) / RESULT_FILE)})
    if not result.rounds_affected and not method.exact:
        log.warning("%s changed nothing: %s", method.name, "; ".join(result.notes))
    return info


__all__ = ["UnlearningError", "serve_withdrawal"]

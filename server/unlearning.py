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
   computed once per forget set and cached in ``unlearned/reference-<key>/``;
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
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedforget.comparison import compare
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset
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
) -> tuple[TensorDict, Cost, str]:
    """The retrained model without ``forget`` (cached per forget set); model, cost, digest."""
    key = hashlib.sha256("\n".join(sorted(forget)).encode()).hexdigest()[:12]
    final = out / UNLEARNED / f"reference-{key}"
    if (final / RESULT_FILE).exists():
        info = json.loads((final / RESULT_FILE).read_text())
        return read_model(final / MODEL_FILE), Cost(**info["cost"]), str(info["model_digest"])
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
    return result.model, result.cost, digest


def _warm_up(grid: Grid, cfg: RunConfig, clients: dict[str, int], store: HistoryStore) -> None:
    """One untimed, uncounted client step, so that one-off start-up costs (imports, the
    first backward pass, data loading) fall on no method's wall time."""
    some = sorted(clients)[:1]
    if some:
        GridFederation(grid, cfg, clients).train(
            server_round=0, global_model=store.global_model(0), clients=some, local_epochs=1
        )


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
    unlearning_request = UnlearningRequest(
        store=store, forget=forget, federation=federation, workdir=str(partial),
        current_model=in_service,
    )
    try:
        method.check(unlearning_request)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    ledger.move(request.request_id, "unlearning", method=method.name)
    _warm_up(grid, cfg, clients, store)
    try:
        retrained, retrain_cost, retrained_digest = reference(
            grid, cfg, store, clients, forget, out
        )
        if method.name == "retrain":  # the reference is this method's result
            result = UnlearningResult(model=retrained, cost=retrain_cost,
                                      rounds_affected=list(range(1, store.last_round + 1)))
        else:
            result = method.unlearn(unlearning_request)
        original = store.global_model(store.last_round)
        forgotten_data: list[ArrayDataset] = []
        for cid in sorted(forget):
            partition = _partition_of(cid)
            if partition is not None and partition < cfg.num_clients:
                forgotten_data.append(load_client_data(cfg, partition)[0])
        backdoor = cfg.backdoor_target if forget & cfg.backdoor_client_ids() else None
        comparison = compare(
            model=new_model(cfg), original=original, unlearned=result.model,
            retrained=retrained, test_set=load_test_set(cfg), forgotten_data=forgotten_data,
            backdoor_target=backdoor, method_cost=result.cost, retrain_cost=retrain_cost,
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
            "metrics": comparison.to_dict(),
            "finished_at": utc_now(),
            **_json_ready(result, final, partial),
        }
        saved_head, head_path = saved_head_of(out, request.request_id, request.client_id)
        info["receipt"] = issue_receipt(cfg=cfg, store=store, info=info,
                                        client_id=request.client_id, saved_head=saved_head)
        info["receipt"]["head_path"] = str(head_path) if head_path is not None else None
        (partial / RESULT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        _commit_dir(partial, final)
        pointer = out / UNLEARNED / "current.json"
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(json.dumps({"request_id": request.request_id, "method": method.name,
                                   "model_path": info["model_path"], "model_digest": digest}))
        os.replace(tmp, pointer)
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

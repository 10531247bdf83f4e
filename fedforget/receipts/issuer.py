"""The server side of the history commitment and of erasure receipts.

* :func:`signing_key` gives the run's Ed25519 key (made only for a run that has signed
  nothing);
* :func:`head_log` gives the run's :class:`fedforget.history.HeadLog`, which signs a tree
  head after every committed round and every ledger change, appends it to
  ``tree_heads.jsonl`` and hands the latest one to the clients in every train message
  (:data:`fedforget.protocol.TREE_HEAD`), which keep it;
* :func:`sign_receipt` signs the receipt of one unlearning result into the result's
  *staging* directory, so that it is committed with the result (one rename) or not at all;
  :func:`publish_receipt` then links it into ``receipts/`` and moves ``receipts/latest``
  (the chain's head) — only ever onto a committed receipt.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.fileio import write_atomic
from fedforget.history import HeadLog, HistoryStore
from fedforget.receipts.receipt import (
    ReceiptInput,
    build_receipt,
    commit_history,
    new_client_salt,
    receipt_digest,
    write_receipt,
)
from fedforget.receipts.records import commit_records
from fedforget.receipts.run_keys import load_manifest, run_signing_key
from fedforget.receipts.statement import Comparison
from fedforget.receipts.tree_head import TreeHead
from fedforget.results import ReceiptInfo, UnlearningOutcome
from fedforget.rundir import RunDirectory

__all__ = [
    "StagedReceipt",
    "head_log",
    "publish_receipt",
    "saved_head_of",
    "sign_receipt",
    "signing_key",
]

STAGED_RECEIPT = "receipt.json"
"""The receipt's file name inside the result directory it is committed with."""


def signing_key(run: RunDirectory, keys_dir: Path | None = None
                ) -> tuple[Ed25519PrivateKey, Path]:
    """The run's private key and its public key's path (made only for a run that has signed
    nothing: :func:`fedforget.receipts.run_keys.run_signing_key`)."""
    return run_signing_key(run.path, keys_dir)


def head_log(store: HistoryStore, run: RunDirectory, keys_dir: Path | None = None) -> HeadLog:
    """The run's head log: it checks that the store reproduces every head signed so far and
    signs a head over the store as it is now (rounds and withdrawal ledger)."""
    key, _ = signing_key(run, keys_dir)
    folder = keys_dir if keys_dir is not None else run.default_keys
    return HeadLog(store, key, manifest=load_manifest(folder))


def saved_head_of(run: RunDirectory, request_id: str, client_id: str
                  ) -> tuple[TreeHead | None, Path | None]:
    """The head the withdrawing client kept: handed in with the withdrawal, else (in
    simulation) the one in its state directory."""
    for path in (run.withdrawal_head(request_id), run.client_state(client_id) / "head.json"):
        if path.exists():
            return TreeHead.from_json(path.read_bytes()), path
    return None, None


class StagedReceipt:
    """A receipt signed into a staging directory, not yet published."""

    def __init__(self, *, info: ReceiptInfo, staged: Path) -> None:
        self.info = info
        self.staged = staged


def _comparison_metrics(outcome: UnlearningOutcome) -> dict[str, float]:
    """The figures a receipt states: each model's test accuracy, forgotten-data accuracy
    and backdoor success where measured, and the L2 distance to the retrained model."""
    flat: dict[str, float] = {}
    for name in ("test_accuracy", "forgotten_accuracy", "backdoor_success", "l2_to_retrained",
                 "forgotten_class_accuracy", "retained_class_accuracy"):
        values = outcome.metrics.get(name)
        if not isinstance(values, dict):
            continue
        for model, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{name.replace('_', '-')}-{model}"] = float(value)
    flat.update(_collateral_metrics(outcome.metrics.get("collateral")))
    return flat


def _collateral_metrics(collateral: object) -> dict[str, float]:
    """Who else is hurt, as receipt figures: each similarity's correlation with the harm
    and its interval, the size of the hurt group and its mean harm against the others'
    (no client is named: the names stay in result.json)."""
    if not isinstance(collateral, dict):
        return {}
    flat: dict[str, float] = {}
    for kind, corr in (collateral.get("correlation") or {}).items():
        for part in ("r", "low", "high"):
            value = (corr or {}).get(part)
            if isinstance(value, int | float):
                flat[f"collateral-{kind}-correlation-{part}"] = float(value)
    flat["collateral-hurt-clients"] = float(len(collateral.get("hurt") or []))
    for key in ("hurt_mean_harm", "others_mean_harm"):
        value = collateral.get(key)
        if isinstance(value, int | float):
            flat[f"collateral-{key.replace('_', '-')}"] = float(value)
    return flat


def sign_receipt(
    *,
    run: RunDirectory,
    store: HistoryStore,
    outcome: UnlearningOutcome,
    key: Ed25519PrivateKey,
    public_key_path: Path,
    staging: Path,
    issuer: str | None = None,
    request: Any = None,
) -> StagedReceipt:
    """Sign the receipt of ``outcome`` into ``staging`` (the result's staging directory).

    The previous receipt of the chain is the committed one ``receipts/latest`` names. The
    32-byte salt of the client commitment waits in the request's outbox
    (``withdrawals/<request>/outbox/<receipt-id>.salt``, mode 0600) until it is delivered to
    the client (:mod:`fedforget.delivery`); should the result not commit, that salt opens no
    receipt.

    For a record-level ``request`` (a :class:`~fedforget.withdrawal.WithdrawalRequest`) the
    receipt also commits to its record ids (:mod:`fedforget.receipts.records`), under a
    second salt waiting in the same outbox (``<receipt-id>.records-salt``) with the ids
    (``<receipt-id>.records``), so that the client can open it for any one record; for a
    class-level request it names the labels.
    """
    previous = None
    if run.latest_receipt.exists():
        previous = receipt_digest((run.receipts / run.latest_receipt.read_text().strip())
                                  .read_bytes())
    saved_head, head_path = saved_head_of(run, outcome.request_id, outcome.client_id)
    salt = new_client_salt()
    receipt_id = f"rc-{uuid.uuid4().hex[:16]}"
    kind = getattr(request, "kind", "client")
    scope: dict[str, Any] | None = None
    records_salt = new_client_salt() if kind == "records" else None
    if records_salt is not None:
        scope = {"kind": "records",
                 "records": commit_records(records_salt, request.record_ids).to_dict()}
    elif kind == "class":
        scope = {"kind": "class", "labels": sorted(request.labels)}
    if kind == "class":  # every client's contributions held the class
        rounds_affected = [r.round for r in store.rounds() if r.participants]
    else:
        rounds_affected = store.client_rounds(outcome.client_id)
    comparison = None
    if outcome.reference.model_digest is not None:
        comparison = Comparison(retrained_model_digest=outcome.reference.model_digest,
                                metrics=_comparison_metrics(outcome))
    envelope = build_receipt(
        ReceiptInput(
            receipt_id=receipt_id,
            issuer=issuer or f"fedforget server of run {run.path.name}",
            request_id=outcome.request_id,
            received_at=outcome.received_at,
            reason=outcome.reason,
            client_id=outcome.client_id,
            client_salt=salt,
            rounds_affected=rounds_affected,
            history=commit_history(store.record_bytes(),
                                   saved_head=saved_head),
            method=outcome.method,
            method_version=outcome.method_version,
            method_parameters=outcome.params,
            seeds={"run-seed": outcome.seed},
            unlearned_model_digest=outcome.model_digest,
            original_model_digest=outcome.original_model_digest,
            comparison=comparison,
            previous_receipt_digest=previous,
            scope=scope,
        ),
        key,
    )
    staged = write_receipt(staging / STAGED_RECEIPT, envelope)
    salt_dir = run.outbox(outcome.request_id)
    salt_dir.mkdir(parents=True, exist_ok=True)
    salt_path = salt_dir / f"{receipt_id}.salt"
    fd = os.open(salt_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex() + "\n")
    if records_salt is not None:
        fd = os.open(salt_dir / f"{receipt_id}.records-salt",
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(records_salt.hex() + "\n")
        (salt_dir / f"{receipt_id}.records").write_text(
            "\n".join(request.record_ids) + "\n")
    info = ReceiptInfo(
        receipt_id=receipt_id,
        receipt_path=run.relative(run.receipt(receipt_id)),
        public_key_path=str(public_key_path.resolve()),
        salt_outbox=run.relative(salt_path),
        head_path=str(head_path) if head_path is not None else None,
    )
    return StagedReceipt(info=info, staged=staged)


def publish_receipt(run: RunDirectory, committed: Path, receipt_id: str) -> Path:
    """Link the committed receipt ``committed`` (inside a committed result directory) into
    ``receipts/<receipt-id>.json`` and make it the chain's head (``receipts/latest``)."""
    run.receipts.mkdir(parents=True, exist_ok=True)
    target = run.receipt(receipt_id)
    try:
        os.link(committed, target)
    except FileExistsError:
        pass
    except OSError:  # another file system, or no hard links: a copy, renamed into place
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(committed, tmp)
        os.replace(tmp, target)
    write_atomic(run.latest_receipt, target.name)
    return target

"""The server side of the history commitment and of erasure receipts.

* :func:`signing_key` gives the run's Ed25519 key (made on first use);
* :class:`HeadSigner` keeps the Merkle tree of the run's round records (RFC 9162 hashing,
  leaves = canonical record bytes), signs a tree head after every committed round,
  appends it to ``tree_heads.jsonl`` and hands the latest one to the clients in every train
  message (:data:`fedforget.protocol.TREE_HEAD`), which keep it;
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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget import protocol
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore, RoundRecord
from fedforget.receipts.errors import ReceiptError
from fedforget.receipts.keys import generate_keys, load_private_key
from fedforget.receipts.merkle import MerkleAccumulator
from fedforget.receipts.receipt import (
    ReceiptInput,
    build_receipt,
    commit_history,
    new_client_salt,
    receipt_digest,
    write_receipt,
)
from fedforget.receipts.statement import Comparison
from fedforget.receipts.tree_head import TreeHead, sign_tree_head, verify_tree_head
from fedforget.results import ReceiptInfo, UnlearningOutcome
from fedforget.rundir import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, RunDirectory

__all__ = [
    "HeadSigner",
    "StagedReceipt",
    "publish_receipt",
    "saved_head_of",
    "sign_receipt",
    "signing_key",
]

STAGED_RECEIPT = "receipt.json"
"""The receipt's file name inside the result directory it is committed with."""


def signing_key(directory: Path) -> tuple[Ed25519PrivateKey, Path]:
    """The private key in ``directory`` (generated on first use) and its public key's path."""
    if not (directory / PRIVATE_KEY_FILE).exists():
        generate_keys(directory)
    return load_private_key(directory / PRIVATE_KEY_FILE), directory / PUBLIC_KEY_FILE


class HeadSigner:
    """Sign a tree head over the round records after every committed round."""

    def __init__(self, store: HistoryStore, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._path = RunDirectory(store.directory).tree_heads
        self._tree = MerkleAccumulator()
        for record in store.record_bytes():  # streamed: O(log n) memory, nothing parsed
            self._tree.append(record)
        self.latest: TreeHead | None = None
        if self._tree.size:
            self.latest = self._last_logged() or self._sign()

    def _last_logged(self) -> TreeHead | None:
        """The last head of the log, if it is this tree's (same size and root): a resumed or
        unlearning run shows it again instead of signing a duplicate."""
        if not self._path.exists():
            return None
        lines = self._path.read_bytes().splitlines()
        if not lines:
            return None
        try:
            head = TreeHead.from_json(lines[-1])
            verify_tree_head(head, public_key=self._key.public_key())
        except ReceiptError:
            return None
        if head.size == self._tree.size and head.root == self._tree.root().hex():
            return head
        return None

    def _sign(self) -> TreeHead:
        head = sign_tree_head(self._tree.size, self._tree.root(), self._key)
        # A log of the heads shown, not the record of truth (the store is; any head can be
        # signed again from it): no fsync on the training thread.
        with self._path.open("ab") as fh:
            fh.write(head.to_json())
        return head

    def on_commit(self, record: RoundRecord) -> None:
        """Add ``record`` (the next round) to the tree and sign the new head."""
        self._tree.append(record.canonical_bytes())
        self.latest = self._sign()

    def config(self) -> dict[str, str]:
        """Train-config entries carrying the latest head to the clients."""
        if self.latest is None:
            return {}
        return {protocol.TREE_HEAD: self.latest.to_json().decode()}


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
    for name in ("test_accuracy", "forgotten_accuracy", "backdoor_success", "l2_to_retrained"):
        values = outcome.metrics.get(name)
        if not isinstance(values, dict):
            continue
        for model, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{name.replace('_', '-')}-{model}"] = float(value)
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
) -> StagedReceipt:
    """Sign the receipt of ``outcome`` into ``staging`` (the result's staging directory).

    The previous receipt of the chain is the committed one ``receipts/latest`` names. The
    32-byte salt of the client commitment waits in the request's outbox
    (``withdrawals/<request>/outbox/<receipt-id>.salt``, mode 0600) until it is delivered to
    the client (:mod:`fedforget.delivery`); should the result not commit, that salt opens no
    receipt.
    """
    previous = None
    if run.latest_receipt.exists():
        previous = receipt_digest((run.receipts / run.latest_receipt.read_text().strip())
                                  .read_bytes())
    saved_head, head_path = saved_head_of(run, outcome.request_id, outcome.client_id)
    salt = new_client_salt()
    receipt_id = f"rc-{uuid.uuid4().hex[:16]}"
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
            rounds_affected=store.client_rounds(outcome.client_id),
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

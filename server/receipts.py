"""Server side of the history commitment and the erasure receipts.

* :class:`HeadSigner` keeps the Merkle tree of the run's round records (RFC 9162 hashing,
  leaves = canonical record bytes), signs a tree head after every committed round with the
  run's Ed25519 key, appends it to ``tree_heads.jsonl`` and hands the latest one to the
  clients in every train message (config key ``tree-head``), which keep it.
* :func:`issue_receipt` signs the erasure receipt of one unlearning run.

The run's keys live in ``<run>/keys`` (``signing.key``, ``signing.pub``; created on first
use) unless the run config names another directory (``keys-dir``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.config import RunConfig
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore, RoundRecord
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
from fedforget.receipts.tree_head import TreeHead, sign_tree_head
from fedforget.task import client_state_dir

HEADS_FILE = "tree_heads.jsonl"
RECEIPTS = "receipts"
PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"


def keys_dir(cfg: RunConfig) -> Path:
    """Where the run's signing keys are."""
    return Path(cfg.keys_dir) if cfg.keys_dir else Path(cfg.out_dir) / "keys"


def signing_key(cfg: RunConfig) -> tuple[Ed25519PrivateKey, Path]:
    """The run's private key (generated on first use) and the path of its public key."""
    directory = keys_dir(cfg)
    if not (directory / PRIVATE_KEY).exists():
        generate_keys(directory)
    return load_private_key(directory / PRIVATE_KEY), directory / PUBLIC_KEY


class HeadSigner:
    """Sign a tree head over the round records after every committed round."""

    def __init__(self, store: HistoryStore, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._path = Path(store.directory) / HEADS_FILE
        self._tree = MerkleAccumulator()
        for record in store.rounds():  # streamed: O(log n) memory
            self._tree.append(record.canonical_bytes())
        self.latest: TreeHead | None = (
            self._sign() if self._tree.size else None
        )

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
        return {"tree-head": self.latest.to_json().decode()}


def _metrics_for_receipt(metrics: Mapping[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name in ("test_accuracy", "forgotten_accuracy", "backdoor_success"):
        for model, value in (metrics.get(name) or {}).items():
            flat[f"{name.replace('_', '-')}-{model}"] = float(value)
    for model, value in metrics["l2_to_retrained"].items():
        flat[f"l2-to-retrained-{model}"] = float(value)
    return flat


def issue_receipt(
    *,
    cfg: RunConfig,
    store: HistoryStore,
    info: Mapping[str, Any],
    client_id: str,
    saved_head: TreeHead | None,
) -> dict[str, str]:
    """Sign and write the receipt of the unlearning described by ``info`` (result.json).

    The salt of the client commitment is written to that client's state directory only.
    Returns the paths written (receipt, public key, salt).
    """
    out = Path(cfg.out_dir)
    key, public_key_path = signing_key(cfg)
    receipts = out / RECEIPTS
    receipts.mkdir(parents=True, exist_ok=True)
    latest = receipts / "latest"
    previous = None
    if latest.exists():
        previous = receipt_digest((receipts / latest.read_text().strip()).read_bytes())
    salt = new_client_salt()
    receipt_id = f"rc-{uuid.uuid4().hex[:16]}"
    request = info["request"]
    reference = info["reference"]
    envelope = build_receipt(
        ReceiptInput(
            receipt_id=receipt_id,
            issuer=f"fedforget server of run {out.name}",
            request_id=request["request_id"],
            received_at=request["received_at"],
            reason=request["reason"],
            client_id=client_id,
            client_salt=salt,
            rounds_affected=store.clients().get(client_id, []),
            history=commit_history((r.canonical_bytes() for r in store.rounds()),
                                   saved_head=saved_head),
            method=info["method"],
            method_version=str(info["method_version"]),
            method_parameters=info["params"],
            seeds={"run-seed": int(info["seed"])},
            unlearned_model_digest=info["model_digest"],
            original_model_digest=info["original_model_digest"],
            comparison=Comparison(
                retrained_model_digest=reference["model_digest"],
                metrics=_metrics_for_receipt(info["metrics"]),
            ),
            previous_receipt_digest=previous,
        ),
        key,
    )
    path = write_receipt(receipts / f"{receipt_id}.json", envelope)
    write_atomic(latest, path.name)
    salt_dir = client_state_dir(out, client_id)
    salt_dir.mkdir(parents=True, exist_ok=True)
    salt_path = salt_dir / f"{receipt_id}.salt"
    fd = os.open(salt_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex() + "\n")
    return {
        "receipt_path": str(path),
        "public_key_path": str(public_key_path),
        "salt_path": str(salt_path),
        "receipt_id": receipt_id,
    }


def saved_head_of(
    out: Path, request_id: str, client_id: str
) -> tuple[TreeHead | None, Path | None]:
    """The head the withdrawing client kept: handed in with the withdrawal, else (in
    simulation) the one in its state directory."""
    for path in (out / "withdrawals" / request_id / "head.json",
                 client_state_dir(out, client_id) / "head.json"):
        if path.exists():
            return TreeHead.from_json(path.read_bytes()), path
    return None, None

"""The layout of a run directory: the one place that knows where each file of a run lives.

.. code-block:: text

    <run>/history.sqlite                  the history index (rounds, blobs, withdrawals)
    <run>/blobs/<round>-<token>.pack      tensor blobs (see fedforget.history.store)
    <run>/tree_heads.jsonl                every signed tree head, in order
    <run>/keys/signing.{key,pub}          the run's Ed25519 key pair (unless ``keys-dir``)
    <run>/metrics.jsonl                   central evaluation after each round (if the app has one)
    <run>/client_evaluation.json          the clients' federated evaluation after the last round
    <run>/receipts/<receipt-id>.json      erasure receipts; ``receipts/latest`` names the last
    <run>/unlearned/<request>/<method>/   one unlearning result: model.fft, result.json, history/
    <run>/unlearned/reference-<key>/      the cached retrained reference for one forget set
    <run>/unlearned/shadow-<key>/         the shadow model of the membership attack
    <run>/unlearned/current.json          the model in service after the latest unlearning
    <run>/withdrawals/<request>/head.json the tree head a client handed in with its request
    <run>/withdrawals/<request>/asked.json how and by which node a client asked itself
    <run>/withdrawals/<request>/outbox/   a receipt's salt until the client has it
    <run>/nodes.json                      client ids pinned to node ids; refused claims
    <run>/deployment.json                 the run trained on a SuperLink's SuperNodes
    <run>/client-state/<client-id>/       a simulated client's own state (head.json, salts)

Every module that reads or writes one of these asks :class:`RunDirectory` for its path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

INDEX_FILE = "history.sqlite"
HEADS_FILE = "tree_heads.jsonl"
METRICS_FILE = "metrics.jsonl"
CLIENT_EVALUATION_FILE = "client_evaluation.json"
KEYS_DIR = "keys"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
RECEIPTS_DIR = "receipts"
LATEST_RECEIPT_FILE = "latest"
UNLEARNED_DIR = "unlearned"
CURRENT_FILE = "current.json"
MODEL_FILE = "model.fft"
RESULT_FILE = "result.json"
REPLAYED_HISTORY_DIR = "history"
WITHDRAWALS_DIR = "withdrawals"
CLIENT_STATE_DIR = "client-state"
HEAD_FILE = "head.json"
NODES_FILE = "nodes.json"
DEPLOYMENT_FILE = "deployment.json"
PARTIAL_MARK = ".partial-"
"""Infix of the hidden staging directories (``.<name>.partial-<token>``) results are
written to before they are renamed into place."""


def forget_key(forget: Iterable[str]) -> str:
    """A short, stable name for a set of forgotten clients (the reference cache key)."""
    return hashlib.sha256("\n".join(sorted(forget)).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunDirectory:
    """The paths of one run directory (nothing is created by asking for a path)."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ history
    @property
    def index(self) -> Path:
        """The history index (``history.sqlite``)."""
        return self.path / INDEX_FILE

    def exists(self) -> bool:
        """Whether this directory holds a history index."""
        return self.index.is_file()

    @property
    def tree_heads(self) -> Path:
        """The log of signed tree heads (``tree_heads.jsonl``)."""
        return self.path / HEADS_FILE

    @property
    def metrics(self) -> Path:
        """Central evaluation per round (``metrics.jsonl``)."""
        return self.path / METRICS_FILE

    @property
    def client_evaluation(self) -> Path:
        """The clients' federated evaluation after the last round."""
        return self.path / CLIENT_EVALUATION_FILE

    # --------------------------------------------------------------------- keys
    @property
    def default_keys(self) -> Path:
        """Where the run's signing keys live unless the run names another directory."""
        return self.path / KEYS_DIR

    # ----------------------------------------------------------------- receipts
    @property
    def receipts(self) -> Path:
        """The directory of erasure receipts."""
        return self.path / RECEIPTS_DIR

    @property
    def latest_receipt(self) -> Path:
        """The file naming the latest receipt (the chain's head)."""
        return self.receipts / LATEST_RECEIPT_FILE

    def receipt(self, receipt_id: str) -> Path:
        """The receipt ``receipt_id``."""
        return self.receipts / f"{receipt_id}.json"

    # ---------------------------------------------------------------- unlearned
    @property
    def unlearned(self) -> Path:
        """Every unlearning result and cached reference."""
        return self.path / UNLEARNED_DIR

    @property
    def current(self) -> Path:
        """The pointer to the model in service after the latest unlearning."""
        return self.unlearned / CURRENT_FILE

    def result_dir(self, request_id: str, method: str) -> Path:
        """The result directory of ``method`` serving request ``request_id``."""
        return self.unlearned / request_id / method

    def reference_dir(self, forget: Iterable[str]) -> Path:
        """The cached retrained reference for the forget set ``forget``."""
        return self.unlearned / f"reference-{forget_key(forget)}"

    def shadow_dir(self, key: str) -> Path:
        """The shadow model of the membership attack, trained once per run
        configuration (``key``) and kept for every later measurement."""
        return self.unlearned / f"shadow-{key}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory (as result files record paths)."""
        return str(Path(path).relative_to(self.path))

    # -------------------------------------------------------------- withdrawals
    def withdrawal_dir(self, request_id: str) -> Path:
        """What the server keeps of one withdrawal request besides the ledger row."""
        return self.path / WITHDRAWALS_DIR / request_id

    def withdrawal_head(self, request_id: str) -> Path:
        """The tree head a client handed in with its withdrawal request."""
        return self.withdrawal_dir(request_id) / HEAD_FILE

    def asked(self, request_id: str) -> Path:
        """The record of a withdrawal the client asked for itself (node, time, reason)."""
        return self.withdrawal_dir(request_id) / "asked.json"

    def outbox(self, request_id: str) -> Path:
        """Receipt salts waiting for delivery to the client (``<receipt-id>.salt``)."""
        return self.withdrawal_dir(request_id) / "outbox"

    def outboxes(self) -> list[Path]:
        """Every withdrawal's outbox that exists."""
        return sorted(p for p in (self.path / WITHDRAWALS_DIR).glob("*/outbox") if p.is_dir())

    @property
    def deployment(self) -> Path:
        """Present when the run trained on a SuperLink's SuperNodes (its client work is
        theirs: never re-simulated)."""
        return self.path / DEPLOYMENT_FILE

    def deployed(self) -> bool:
        """Whether the run trained on a deployment (see :attr:`deployment`)."""
        return self.deployment.is_file()

    @property
    def nodes(self) -> Path:
        """Client ids pinned to authenticated node ids, and refused claims
        (:mod:`fedforget.identity`)."""
        return self.path / NODES_FILE

    def client_state(self, client_id: str) -> Path:
        """A simulated client's own state directory (a SuperNode sets ``state-dir``)."""
        return self.path / CLIENT_STATE_DIR / client_id

    def partial_dirs(self) -> list[Path]:
        """Staging directories a killed process left behind (``.<name>.partial-*``)."""
        if not self.unlearned.is_dir():
            return []
        return sorted(p for p in self.unlearned.rglob(f".*{PARTIAL_MARK}*") if p.is_dir())

"""Signed tree heads: the server's signed statement of what its history holds.

After each round (and after each change of the withdrawal ledger) the server signs

.. code-block:: json

    {"key-id": "<hex>", "ledger-root": "<hex MTH>", "ledger-size": 2,
     "root": "<hex MTH>", "size": 12, "timestamp": "2025-01-31T12:00:00Z"}

(RFC 8785 canonical JSON) as a DSSE message of payload type
``application/vnd.fedforget.tree-head.v2+json``: the bytes signed are
``PAE(type, canonical JSON)`` (:meth:`TreeHead.signed_bytes`). ``size`` and ``root`` are the
RFC 9162 Merkle tree of the round records (leaf ``t - 1`` is round ``t``'s canonical record,
which carries its participants, weights, example counts and the digest of the run context:
configuration, roster, codec, retention, initial model); ``ledger-size`` and ``ledger-root``
are the Merkle tree of the withdrawal ledger's events (every request as received, every
state change), in order. The head travels as the signed fields plus ``"signature": "<base64
Ed25519>"``.

Why the ledger is a second tree and not signed row by row: a signature on each row would
catch an edited row but not a deleted one, nor a row put back to an earlier signed state;
an append-only log whose size and root the head signs catches all three, and lets a
withdrawing client check, with a consistency proof, that its request stays in the log.
It is a separate tree so that leaf ``t - 1`` of the round tree stays round ``t`` (receipts
cite rounds by number).

A client keeps the latest head it was shown; later, a consistency proof from that head to the
history a receipt cites shows that the server did not rewrite what the client saw.
Version 1 heads (no ledger) are refused with a message saying so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedforget.receipts._util import (
    b64decode,
    b64encode,
    canonical_json,
    parse_utc,
    require_fields,
    require_hex64,
    require_int,
    utc_now,
)
from fedforget.receipts.dsse import Envelope, pae
from fedforget.receipts.errors import ConsistencyProofError, TreeHeadError
from fedforget.receipts.keys import key_id
from fedforget.receipts.manifest import KeyManifest, check_key_valid, verify_envelope_signature
from fedforget.receipts.merkle import EMPTY_ROOT, tree_root, verify_consistency

__all__ = [
    "EMPTY_LEDGER_ROOT",
    "TREE_HEAD_PAYLOAD_TYPE",
    "TreeHead",
    "sign_tree_head",
    "tree_head_for",
    "verify_head_extends",
    "verify_tree_head",
]

TREE_HEAD_PAYLOAD_TYPE = "application/vnd.fedforget.tree-head.v2+json"
"""DSSE payload type under which tree heads are signed (v1: no ledger, Python JSON)."""

_FIELDS = ("key-id", "ledger-root", "ledger-size", "root", "signature", "size", "timestamp")
_V1_FIELDS = ("key-id", "root", "signature", "size", "timestamp")
EMPTY_LEDGER_ROOT = EMPTY_ROOT.hex()
"""``ledger-root`` of a run with no withdrawal event: the MTH of the empty tree."""


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A signed tree head.

    Attributes
    ----------
    size
        Number of leaves of the round tree (committed rounds).
    root
        Hex MTH of those leaves.
    timestamp
        RFC 3339 UTC time of signing.
    key_id
        Hex SHA-256 of the signer's raw public key.
    signature
        Base64 Ed25519 signature over :meth:`signed_bytes`.
    ledger_size
        Number of withdrawal-ledger events (keyword; default 0).
    ledger_root
        Hex MTH of those events (keyword; default the empty tree's).
    """

    size: int
    root: str
    timestamp: str
    key_id: str
    signature: str
    ledger_size: int = 0
    ledger_root: str = EMPTY_LEDGER_ROOT

    def __post_init__(self) -> None:
        require_int(self.size, "tree head size", TreeHeadError)
        require_hex64(self.root, "tree head root", TreeHeadError)
        parse_utc(self.timestamp, "tree head timestamp", TreeHeadError)
        require_hex64(self.key_id, "tree head key-id", TreeHeadError)
        require_int(self.ledger_size, "tree head ledger-size", TreeHeadError)
        require_hex64(self.ledger_root, "tree head ledger-root", TreeHeadError)
        if self.ledger_size == 0 and self.ledger_root != EMPTY_LEDGER_ROOT:
            raise TreeHeadError(
                f"tree head ledger-root is {self.ledger_root} for an empty ledger; expected "
                f"{EMPTY_LEDGER_ROOT}"
            )
        if len(b64decode(self.signature, "tree head signature", TreeHeadError)) != 64:
            raise TreeHeadError("tree head signature is not 64 bytes (Ed25519)")

    def body(self) -> dict[str, Any]:
        """The signed fields."""
        return {
            "key-id": self.key_id,
            "ledger-root": self.ledger_root,
            "ledger-size": self.ledger_size,
            "root": self.root,
            "size": self.size,
            "timestamp": self.timestamp,
        }

    def ledger_root_bytes(self) -> bytes:
        """The ledger root as 32 bytes."""
        return bytes.fromhex(self.ledger_root)

    def signed_bytes(self) -> bytes:
        """``PAE(TREE_HEAD_PAYLOAD_TYPE, canonical JSON of body())``: the bytes signed."""
        return pae(TREE_HEAD_PAYLOAD_TYPE, canonical_json(self.body(), TreeHeadError))

    def root_bytes(self) -> bytes:
        """The root as 32 bytes."""
        return bytes.fromhex(self.root)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (signed fields plus ``signature``)."""
        return {**self.body(), "signature": self.signature}

    def to_json(self) -> bytes:
        """Canonical JSON and one newline, as saved by clients."""
        return canonical_json(self.to_dict(), TreeHeadError) + b"\n"

    @classmethod
    def from_dict(cls, data: object, where: str = "tree head") -> TreeHead:
        """Parse the JSON form; refuses unknown or missing fields.

        Raises
        ------
        TreeHeadError
            If a field is unknown, missing or malformed, or the head is of version 1.
        """
        if isinstance(data, dict) and set(data) == set(_V1_FIELDS):
            raise TreeHeadError(
                f"{where} is a version 1 tree head (no ledger-size, ledger-root); this "
                "fedforget signs and reads version 2 heads only (RFC 8785, withdrawal "
                "ledger bound): heads of runs trained before cannot be checked"
            )
        fields = require_fields(data, where, TreeHeadError, _FIELDS)
        return cls(
            size=fields["size"],
            root=fields["root"],
            timestamp=fields["timestamp"],
            key_id=fields["key-id"],
            signature=fields["signature"],
            ledger_size=fields["ledger-size"],
            ledger_root=fields["ledger-root"],
        )

    @classmethod
    def from_json(cls, data: bytes) -> TreeHead:
        """Parse bytes written by :meth:`to_json` (any JSON spelling is accepted).

        Raises
        ------
        TreeHeadError
            If the bytes are not JSON of a tree head.
        """
        try:
            parsed = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TreeHeadError(f"not UTF-8 JSON: {exc}") from exc
        return cls.from_dict(parsed)

    def _envelope(self) -> Envelope:
        return Envelope(
            payload=canonical_json(self.body(), TreeHeadError),
            payload_type=TREE_HEAD_PAYLOAD_TYPE,
            keyid=self.key_id,
            signature=b64decode(self.signature, "tree head signature", TreeHeadError),
        )


def sign_tree_head(
    size: int,
    root: bytes | str,
    private_key: Ed25519PrivateKey,
    *,
    ledger_size: int = 0,
    ledger_root: bytes | str = EMPTY_LEDGER_ROOT,
    timestamp: str | None = None,
) -> TreeHead:
    """Sign the head (``size``, ``root``, ``ledger_size``, ``ledger_root``) at ``timestamp``
    (default: now). A server signs through :class:`fedforget.history.heads.HeadLog`, which
    computes all four from the store and never signs two roots for one size."""
    root_hex = root.hex() if isinstance(root, bytes | bytearray) else root
    ledger_hex = ledger_root.hex() if isinstance(ledger_root, bytes | bytearray) else ledger_root
    unsigned = TreeHead(
        size=size,
        root=root_hex,
        timestamp=timestamp or utc_now(),
        key_id=key_id(private_key.public_key()),
        signature=b64encode(bytes(64)),
        ledger_size=ledger_size,
        ledger_root=ledger_hex,
    )
    signature = private_key.sign(unsigned.signed_bytes())
    return replace(unsigned, signature=b64encode(signature))


def tree_head_for(
    records: Iterable[bytes],
    private_key: Ed25519PrivateKey,
    *,
    ledger_events: Iterable[bytes] = (),
    timestamp: str | None = None,
) -> TreeHead:
    """Sign the head of the tree whose leaves are ``records`` (canonical record bytes) and
    the ledger tree whose leaves are ``ledger_events`` (canonical event bytes).

    The roots are computed in a stream: memory stays :math:`O(\\log n)` hashes.
    """
    size, root = tree_root(records)
    ledger_size, ledger_root = tree_root(ledger_events)
    return sign_tree_head(size, root, private_key, ledger_size=ledger_size,
                          ledger_root=ledger_root, timestamp=timestamp)


def verify_tree_head(
    head: TreeHead,
    *,
    public_key: Ed25519PublicKey | None = None,
    manifest: KeyManifest | None = None,
    what: str = "tree head",
) -> None:
    """Check the head's signature under ``public_key`` or the manifest key it names.

    With a manifest, the key must also have been valid at the head's timestamp.

    Raises
    ------
    SignatureError
        If the signature does not verify, or the head names another key than the verifying
        one.
    SigningKeyError
        If the manifest does not list the key or it was not valid at the head's timestamp.
    """
    if not isinstance(head, TreeHead):
        raise TreeHeadError(f"{what} is a {type(head).__name__}; expected a TreeHead")
    _, entry = verify_envelope_signature(
        head._envelope(), public_key=public_key, manifest=manifest, what=what
    )
    if entry is not None:
        check_key_valid(entry, head.timestamp, what)


def verify_head_extends(old: TreeHead, new: TreeHead, proof: Sequence[bytes | str]) -> None:
    """Check that ``new`` extends ``old`` (the signatures are checked separately).

    Raises
    ------
    ConsistencyProofError
        If the proof does not show that the first ``old.size`` leaves of ``new`` hash to
        ``old.root``.
    """
    try:
        nodes = [bytes.fromhex(p) if isinstance(p, str) else bytes(p) for p in proof]
    except ValueError as exc:
        raise ConsistencyProofError(f"proof holds a hash that is not hex: {exc}") from None
    try:
        verify_consistency(old.size, new.size, old.root_bytes(), new.root_bytes(), nodes)
    except ConsistencyProofError as exc:
        raise ConsistencyProofError(
            f"head of size {new.size} does not extend head of size {old.size}: {exc.detail}"
        ) from None

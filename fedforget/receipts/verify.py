"""Offline verification of an erasure receipt; fails closed.

:func:`verify_receipt` returns a :class:`VerifiedReceipt` only when every check passes, and
otherwise raises the :class:`~fedforget.receipts.errors.ReceiptError` subclass of the first
check that failed, its message prefixed with the check's name. The checks, in order:

1. **envelope** – the file is the canonical JSON of a one-signature DSSE envelope.
2. **signature** – Ed25519 over ``PAE(payloadType, payload)`` verifies under the given key
   (or the manifest key the envelope names), and the envelope names that key.
3. **payload type** – ``application/vnd.in-toto+json``.
4. **statement** – an in-toto Statement v1 with subjects ``unlearned-model`` and
   ``original-model``.
5. **predicate version** – ``https://fedforget.dev/erasure-receipt/v1``.
6. **predicate** – every field known, present and well-formed.
7. **key** – the predicate's ``signer-key-id`` is the verifying key; with a manifest, that key
   was valid (not yet revoked) at ``issued-at``.
8. **consistency proof** – when the receipt carries one: the cited head is signed, and the
   proof shows the cited history extends it; with ``saved_head``, the receipt must prove
   consistency from exactly that head.
9. **subject digest** – the model files' SHA-256 equal the subjects (when given).
10. **client commitment** – ``SHA256(salt || client_id)`` equals the commitment (when given).
11. **previous receipt** – the chain link names the given previous receipt (when given).
12. **record commitment** – a record opening (:mod:`fedforget.receipts.records`) leads to
    the receipt's record commitment (when given; the receipt must be record-level).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedforget.receipts.dsse import parse_envelope
from fedforget.receipts.errors import (
    ClientCommitmentError,
    ConsistencyProofError,
    PayloadTypeError,
    PreviousReceiptError,
    SignatureError,
    SubjectDigestError,
)
from fedforget.receipts.manifest import KeyManifest, check_key_valid, verify_envelope_signature
from fedforget.receipts.merkle import verify_consistency
from fedforget.receipts.receipt import client_commitment, receipt_digest
from fedforget.receipts.records import (
    RecordCommitmentError,
    RecordOpening,
    verify_record_opening,
)
from fedforget.receipts.statement import PAYLOAD_TYPE, ErasureStatement, parse_statement
from fedforget.receipts.tree_head import TreeHead, verify_tree_head

__all__ = ["VerifiedReceipt", "summary_line", "verify_receipt"]


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    """What a receipt that passed every check says, and which optional checks were made.

    Attributes
    ----------
    statement
        The parsed statement (all predicate fields).
    signer_key_id
        Key id of the key that verified the signature.
    checks
        Names of the checks that passed, in order (``"signature"``, ``"subject digest"``...).
    """

    statement: ErasureStatement
    signer_key_id: str
    checks: tuple[str, ...]

    @property
    def receipt_id(self) -> str:
        """The receipt's id."""
        return self.statement.receipt_id

    @property
    def unlearned_model(self) -> str:
        """``"sha256:<hex>"`` of the unlearned model."""
        return self.statement.unlearned_model

    @property
    def original_model(self) -> str:
        """``"sha256:<hex>"`` of the original model."""
        return self.statement.original_model

    @property
    def predicate(self) -> Mapping[str, Any]:
        """The predicate as JSON."""
        predicate: Mapping[str, Any] = self.statement.statement["predicate"]
        return predicate

    def summary(self) -> str:
        """One line: see :func:`summary_line`."""
        return summary_line(self)


def _ranges(rounds: tuple[int, ...]) -> str:
    if not rounds:
        return "none"
    parts: list[str] = []
    start = prev = rounds[0]
    for r in rounds[1:] + (0,):
        if r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = r
    return ",".join(parts)


def summary_line(verified: VerifiedReceipt) -> str:
    """One line saying what was verified, e.g. for the command line.

    Examples
    --------
    ``OK receipt r-1: request req-7 (2025-01-31T12:00:00Z) unlearned by federaser 1 over
    rounds 1-3,5; model sha256:3f2a9c01d2e4 (was sha256:8b1e07aa4c11); history 30 rounds root
    1a2b3c4d5e6f; signed by key 9d8e7f6a5b4c at 2025-02-01T08:00:00Z; checked: signature, ...``
    """
    s = verified.statement
    history = f"history {s.history.size} rounds root {s.history.root[:12]}"
    if s.history.consistency is not None:
        history += f" extending head of size {s.history.consistency.from_head.size}"
    return (
        f"OK receipt {s.receipt_id}: request {s.request_id} ({s.received_at}) unlearned by "
        f"{s.method} {s.method_version} over rounds {_ranges(s.rounds_affected)}; "
        f"model {s.unlearned_model[:19]} (was {s.original_model[:19]}); {history}; "
        f"signed by key {verified.signer_key_id[:12]} at {s.issued_at}; "
        f"checked: {', '.join(verified.checks)}"
    )


def _check_history(
    s: ErasureStatement,
    *,
    public_key: Ed25519PublicKey | None,
    manifest: KeyManifest | None,
    saved_head: TreeHead | None,
) -> str | None:
    consistency = s.history.consistency
    if saved_head is not None:
        if not isinstance(saved_head, TreeHead):
            raise ConsistencyProofError(
                f"saved head is a {type(saved_head).__name__}; expected a TreeHead"
            )
        if consistency is None:
            raise ConsistencyProofError(
                f"the receipt carries no proof from the saved head of size {saved_head.size}; "
                "expected one"
            )
        cited = consistency.from_head
        if (cited.size, cited.root) != (saved_head.size, saved_head.root):
            raise ConsistencyProofError(
                f"the receipt proves consistency from a head of size {cited.size} root "
                f"{cited.root}; the saved head has size {saved_head.size} root "
                f"{saved_head.root}"
            )
        verify_tree_head(saved_head, public_key=public_key, manifest=manifest, what="saved head")
    if consistency is None:
        return None
    verify_tree_head(
        consistency.from_head, public_key=public_key, manifest=manifest, what="cited tree head"
    )
    try:
        verify_consistency(
            consistency.from_head.size,
            s.history.size,
            consistency.from_head.root_bytes(),
            bytes.fromhex(s.history.root),
            [bytes.fromhex(p) for p in consistency.proof],
        )
    except ConsistencyProofError as exc:
        raise ConsistencyProofError(
            f"the history of {s.history.size} rounds (root {s.history.root}) does not extend "
            f"the head of size {consistency.from_head.size}: {exc.detail}"
        ) from None
    return f"consistency proof from size {consistency.from_head.size}"


def _check_model(what: str, data: bytes, expected: str) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SubjectDigestError(f"{what} is a {type(data).__name__}; expected bytes")
    found = "sha256:" + hashlib.sha256(data).hexdigest()
    if found != expected:
        raise SubjectDigestError(f"{what} {found} does not match receipt subject {expected}")


def verify_receipt(
    envelope_bytes: bytes,
    *,
    public_key: Ed25519PublicKey | None = None,
    manifest: KeyManifest | None = None,
    model_bytes: bytes | None = None,
    original_model_bytes: bytes | None = None,
    saved_head: TreeHead | None = None,
    salt: bytes | None = None,
    client_id: str | None = None,
    previous_receipt: bytes | None = None,
    record_opening: RecordOpening | None = None,
) -> VerifiedReceipt:
    """Verify a receipt file's bytes; return its summary or raise.

    Parameters
    ----------
    envelope_bytes
        The receipt file as written by :func:`~fedforget.receipts.write_receipt`.
    public_key, manifest
        Exactly one: the server's public key, or a key manifest verified against it
        (:meth:`KeyManifest.from_json`), for receipts signed by rotated keys.
    model_bytes
        The unlearned model file (fp32 encoding, ``model.fft``); checked against the
        ``unlearned-model`` subject.
    original_model_bytes
        The original model file; checked against the ``original-model`` subject.
    saved_head
        The tree head the client kept; the receipt must prove the history extends it.
    salt, client_id
        Together: check that the receipt is about ``client_id``.
    previous_receipt
        The previous receipt file; checked against ``previous-receipt``.
    record_opening
        The client's opening of one record; checked against the receipt's record
        commitment (``scope.records``).

    Raises
    ------
    ReceiptError
        The subclass of the first check that failed (see the module docstring).
    """
    envelope = parse_envelope(envelope_bytes)
    signer, entry = verify_envelope_signature(
        envelope, public_key=public_key, manifest=manifest, what="receipt"
    )
    checks = ["signature"]
    if envelope.payload_type != PAYLOAD_TYPE:
        raise PayloadTypeError(
            f"payloadType is {envelope.payload_type!r}; expected {PAYLOAD_TYPE!r}"
        )
    s = parse_statement(envelope.payload)
    checks.append("predicate")
    if s.signer_key_id != signer:
        raise SignatureError(
            f"predicate signer-key-id is {s.signer_key_id}; the key that verifies the receipt "
            f"is {signer}"
        )
    if entry is not None:
        check_key_valid(entry, s.issued_at, "receipt")
        checks.append("key validity")
    history = _check_history(s, public_key=public_key, manifest=manifest, saved_head=saved_head)
    if history is not None:
        checks.append(history)
    if model_bytes is not None:
        _check_model("model file", model_bytes, s.unlearned_model)
        checks.append("model digest")
    if original_model_bytes is not None:
        _check_model("original model file", original_model_bytes, s.original_model)
        checks.append("original model digest")
    if (salt is None) != (client_id is None):
        raise ClientCommitmentError("give both salt and client_id to check the commitment")
    if salt is not None and client_id is not None:
        found = client_commitment(salt, client_id)
        if found != s.client_commitment:
            raise ClientCommitmentError(
                f"salt and client id give {found}; the receipt commits to "
                f"{s.client_commitment}"
            )
        checks.append("client commitment")
    if previous_receipt is not None:
        found = receipt_digest(bytes(previous_receipt))
        if s.previous_receipt != found:
            raise PreviousReceiptError(
                f"the receipt names previous receipt {s.previous_receipt}; the given file is "
                f"{found}"
            )
        checks.append("previous receipt")
    if record_opening is not None:
        if s.scope is None or s.scope.get("kind") != "records":
            raise RecordCommitmentError("the receipt commits to no records (it is not a "
                                        "record-level receipt)")
        verify_record_opening(record_opening, s.scope["records"])
        checks.append(f"record {record_opening.record_id} covered")
    return VerifiedReceipt(s, signer, tuple(checks))

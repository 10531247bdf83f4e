"""Building and writing erasure receipts (DSSE envelopes over in-toto statements).

.. code-block:: python

    salt = new_client_salt()                      # goes to the withdrawn client only
    history = commit_history((r.canonical_bytes() for r in store.rounds()),
                             saved_head=head_the_client_kept)
    envelope = build_receipt(ReceiptInput(..., client_id="client-003", client_salt=salt,
                                          history=history, ...), signing_key)
    write_receipt(out / "receipt.json", envelope)

The withdrawn client appears only as the commitment

.. math:: c = \\mathrm{SHA256}(s \\,\\|\\, \\mathrm{UTF8}(\\mathit{client\\_id})),
          \\qquad s \\in \\{0,1\\}^{256} \\text{ random}

so the receipt can be published; the client (who alone receives :math:`s`) can show that the
receipt is about it, and nobody without :math:`s` can test guesses of the id.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsIndex

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.receipts._util import utc_now, write_new_file
from fedforget.receipts.dsse import envelope_bytes, sign_envelope
from fedforget.receipts.errors import (
    ClientCommitmentError,
    ConsistencyProofError,
    EnvelopeError,
    PredicateError,
)
from fedforget.receipts.keys import key_id
from fedforget.receipts.merkle import (
    consistency_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
)
from fedforget.receipts.statement import (
    COMMITMENT_SCHEME,
    ORIGINAL_SUBJECT,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    UNLEARNED_SUBJECT,
    Comparison,
    Consistency,
    HistoryCommitment,
    parse_statement,
    statement_payload,
)
from fedforget.receipts.tree_head import TreeHead

__all__ = [
    "SALT_SIZE",
    "ReceiptInput",
    "build_receipt",
    "client_commitment",
    "commit_history",
    "new_client_salt",
    "receipt_digest",
    "write_receipt",
]

SALT_SIZE = 32
"""Bytes of the random salt of the client commitment."""


def new_client_salt() -> bytes:
    """32 random bytes from the OS CSPRNG."""
    return secrets.token_bytes(SALT_SIZE)


def client_commitment(salt: bytes, client_id: str) -> str:
    """``"sha256:" + hex(SHA256(salt || UTF8(client_id)))``.

    Raises
    ------
    ClientCommitmentError
        If the salt is not 32 bytes or the client id is empty.
    """
    if not isinstance(salt, bytes | bytearray) or len(salt) != SALT_SIZE:
        size = len(salt) if isinstance(salt, bytes | bytearray) else type(salt).__name__
        raise ClientCommitmentError(f"salt has {size} bytes; expected {SALT_SIZE}")
    if not isinstance(client_id, str) or not client_id:
        raise ClientCommitmentError(f"client id is {client_id!r}; expected a non-empty string")
    return "sha256:" + hashlib.sha256(bytes(salt) + client_id.encode("utf-8")).hexdigest()


def commit_history(
    records: Iterable[bytes], *, saved_head: TreeHead | None = None
) -> HistoryCommitment:
    """Size, root and (from ``saved_head``) consistency proof of the history ``records``.

    Parameters
    ----------
    records
        Canonical bytes of the round records in round order
        (``r.canonical_bytes() for r in store.rounds()``).
    saved_head
        The head the withdrawn client kept, if any. Its signature is not checked here (the
        verifier checks it); its size and root are.

    Raises
    ------
    ConsistencyProofError
        If the saved head is larger than the history, or the history's first
        ``saved_head.size`` records do not hash to its root (the history was rewritten).
    """
    hashes = [leaf_hash(r) for r in records]
    root = root_from_leaf_hashes(hashes)
    if saved_head is None:
        return HistoryCommitment(len(hashes), root.hex())
    if saved_head.size > len(hashes):
        raise ConsistencyProofError(
            f"the saved head has size {saved_head.size}, larger than the history's "
            f"{len(hashes)} rounds"
        )
    old_root = root_from_leaf_hashes(hashes, saved_head.size)
    if old_root != saved_head.root_bytes():
        raise ConsistencyProofError(
            f"the history's first {saved_head.size} records hash to {old_root.hex()}, but the "
            f"saved head says {saved_head.root}: the history was rewritten"
        )
    proof = consistency_proof(hashes, saved_head.size)
    return HistoryCommitment(
        len(hashes), root.hex(), Consistency(saved_head, tuple(p.hex() for p in proof))
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptInput:
    """Everything a receipt states.

    Attributes
    ----------
    receipt_id
        Unique id of this receipt.
    issuer
        Who issues it (the federation / server name).
    request_id, received_at, reason
        The withdrawal request: its id, RFC 3339 UTC arrival time, and stated reason.
    client_id
        The withdrawn client's id; only its salted commitment enters the receipt.
    client_salt
        32 random bytes (:func:`new_client_salt`), to be given to that client alone.
    rounds_affected
        Rounds in which the client's updates entered the model.
    history
        The history the receipt cites (:func:`commit_history`).
    method, method_version, method_parameters, seeds
        The unlearning method's registry name, its version, the parameters it ran with, and
        the seeds it used.
    unlearned_model_digest, original_model_digest
        ``"sha256:<hex>"`` of the fp32 encoding of the models after and before unlearning.
    comparison
        The comparison with the model retrained without the client, when it was made.
    previous_receipt_digest
        :func:`receipt_digest` of the previous receipt this server issued, if any.
    scope
        For a record-level request ``{"kind": "records", "records": <RecordCommitment
        .to_dict()>}``, for a class-level one ``{"kind": "class", "labels": [...]}``;
        None (no ``scope`` field) for a whole client.
    issued_at
        RFC 3339 UTC time of issue (default: now).
    """

    receipt_id: str
    issuer: str
    request_id: str
    received_at: str
    reason: str
    client_id: str
    client_salt: bytes
    rounds_affected: Sequence[int]
    history: HistoryCommitment
    method: str
    method_version: str
    method_parameters: Mapping[str, Any] = field(default_factory=dict)
    seeds: Mapping[str, int] = field(default_factory=dict)
    unlearned_model_digest: str
    original_model_digest: str
    comparison: Comparison | None = None
    previous_receipt_digest: str | None = None
    issued_at: str | None = None
    scope: Mapping[str, Any] | None = None  # predicate "scope": record or class requests


def _integers(values: Iterable[object], what: str) -> list[int]:
    """Python ints of ``values`` (NumPy integers accepted, floats and bools refused)."""
    out: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, SupportsIndex):
            raise PredicateError(f"{what} holds {value!r}; expected integers")
        out.append(operator.index(value))
    return out


def _subject(name: str, digest: str) -> dict[str, Any]:
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise PredicateError(f"{name} digest is {digest!r}; expected 'sha256:<hex>'")
    return {"name": name, "digest": {"sha256": digest.removeprefix("sha256:")}}


def _statement(inputs: ReceiptInput, signer_key_id: str) -> dict[str, Any]:
    statement = _base_statement(inputs, signer_key_id)
    if inputs.scope is not None:
        statement["predicate"]["scope"] = dict(inputs.scope)
    return statement


def _base_statement(inputs: ReceiptInput, signer_key_id: str) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            _subject(UNLEARNED_SUBJECT, inputs.unlearned_model_digest),
            _subject(ORIGINAL_SUBJECT, inputs.original_model_digest),
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "receipt-id": inputs.receipt_id,
            "issued-at": inputs.issued_at or utc_now(),
            "issuer": inputs.issuer,
            "signer-key-id": signer_key_id,
            "request": {
                "id": inputs.request_id,
                "received-at": inputs.received_at,
                "reason": inputs.reason,
            },
            "withdrawn-client": {
                "scheme": COMMITMENT_SCHEME,
                "commitment": client_commitment(inputs.client_salt, inputs.client_id),
            },
            "rounds-affected": _integers(inputs.rounds_affected, "rounds_affected"),
            "history": inputs.history.to_dict(),
            "method": {
                "name": inputs.method,
                "version": inputs.method_version,
                "parameters": dict(inputs.method_parameters),
                "seeds": dict(zip(inputs.seeds, _integers(inputs.seeds.values(), "seeds"),
                                  strict=True)),
            },
            "comparison": None if inputs.comparison is None else inputs.comparison.to_dict(),
            "previous-receipt": inputs.previous_receipt_digest,
        },
    }


def _refuse_raw_client_id(value: object, client_id: str, where: str) -> None:
    """Refuse a predicate that names the client in clear (a parameter, the reason...)."""
    if isinstance(value, str):
        if value == client_id or re.search(rf"(?<![\w-]){re.escape(client_id)}(?![\w-])", value):
            raise PredicateError(
                f"{where} names the withdrawn client {client_id!r} in clear; the receipt may "
                "carry it only as a salted commitment"
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_raw_client_id(key, client_id, f"{where} key")
            _refuse_raw_client_id(item, client_id, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _refuse_raw_client_id(item, client_id, f"{where}[{i}]")


def build_receipt(inputs: ReceiptInput, signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign the receipt described by ``inputs``; return the DSSE envelope as a dict.

    The statement is checked by the same parser that verification uses, and the consistency
    proof (if any) is checked against the history root, so a receipt is only issued if it
    verifies.

    Raises
    ------
    PredicateError
        If an input has the wrong form (the message names the predicate field).
    ClientCommitmentError
        If the salt is not 32 bytes or the client id is empty.
    ConsistencyProofError
        If the consistency proof does not lead from the saved head to the history root.
    """
    if not isinstance(inputs, ReceiptInput):
        raise PredicateError(f"inputs is a {type(inputs).__name__}; expected a ReceiptInput")
    signer = key_id(signing_key.public_key())
    payload = statement_payload(_statement(inputs, signer))
    parsed = parse_statement(payload)
    if parsed.history.consistency is not None:
        c = parsed.history.consistency
        verify_consistency(
            c.from_head.size,
            parsed.history.size,
            c.from_head.root_bytes(),
            bytes.fromhex(parsed.history.root),
            [bytes.fromhex(p) for p in c.proof],
        )
    _refuse_raw_client_id(parsed.statement["predicate"], inputs.client_id, "predicate")
    return sign_envelope(payload, PAYLOAD_TYPE, signing_key)


def receipt_digest(envelope: Mapping[str, Any] | bytes) -> str:
    """``"sha256:<hex>"`` of the receipt file (canonical envelope JSON and a newline).

    This is what the next receipt's ``previous-receipt`` holds; it equals ``sha256sum`` of the
    file written by :func:`write_receipt`.
    """
    data = envelope if isinstance(envelope, bytes) else envelope_bytes(envelope)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_receipt(path: str | os.PathLike[str], envelope: Mapping[str, Any]) -> Path:
    """Write ``envelope`` to ``path`` as canonical JSON and a newline, atomically.

    Raises
    ------
    EnvelopeError
        If ``path`` exists (receipts are never replaced) or the envelope is not JSON.
    """
    data = envelope_bytes(envelope)
    try:
        return write_new_file(path, data)
    except FileExistsError:
        raise EnvelopeError(f"{path} exists; refusing to replace a receipt") from None



"""The erasure-receipt statement: an in-toto Statement v1 with our predicate, and its schema.

Wire form of the payload (RFC 8785 canonical JSON; keys of our predicate are kebab-case):

.. code-block:: text

    {
      "_type": "https://in-toto.io/Statement/v1",
      "subject": [
        {"name": "unlearned-model", "digest": {"sha256": "<hex>"}},
        {"name": "original-model",  "digest": {"sha256": "<hex>"}}
      ],
      "predicateType": "https://fedforget.dev/erasure-receipt/v2",
      "predicate": {
        "receipt-id": "...", "issued-at": "<RFC 3339 UTC>", "issuer": "...",
        "signer-key-id": "<hex SHA-256 of the raw Ed25519 public key>",
        "request": {"id": "...", "received-at": "<RFC 3339 UTC>", "reason": "..."},
        "withdrawn-client": {"scheme": "sha256(salt || utf8(client-id)), 32-byte salt",
                             "commitment": "sha256:<hex>"},
        "rounds-affected": [1, 2, 5],
        "history": {"tree-size": 30, "root": "<hex MTH>",
                    "consistency": null | {"from-head": <signed tree head>,
                                           "proof": ["<hex>", ...]}},
        "method": {"name": "federaser", "version": "1", "parameters": {...},
                   "seeds": {"name": 7, ...}},
        "comparison": null | {"retrained-model": "sha256:<hex>",
                              "metrics": {"name": "<decimal string>", ...}},
        "previous-receipt": null | "sha256:<hex of the previous receipt file>",
        "scope": {"kind": "records", "records": {"count": 5, "root": "<hex>",
                                                 "scheme": "..."}}
                 | {"kind": "class", "labels": [3]}       (only below whole clients)
      }
    }

``scope`` is present only in receipts of record- and class-level requests
(:mod:`fedforget.erasure`); a whole-client receipt has none, as before.

:func:`parse_statement` checks every field: an unknown field, a missing one, another
``_type`` or ``predicateType``, or a value of the wrong form raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from fedforget.receipts._util import (
    canonical_json,
    parse_canonical_json,
    parse_utc,
    require_digest,
    require_fields,
    require_hex64,
    require_int,
    require_str,
)
from fedforget.receipts.errors import (
    PredicateError,
    PredicateVersionError,
    StatementError,
    TreeHeadError,
)
from fedforget.receipts.tree_head import TreeHead

__all__ = [
    "COMMITMENT_SCHEME",
    "ORIGINAL_SUBJECT",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "UNLEARNED_SUBJECT",
    "Comparison",
    "Consistency",
    "ErasureStatement",
    "HistoryCommitment",
    "decimal_string",
    "parse_statement",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
"""DSSE payload type of an in-toto statement."""

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
"""``_type`` of an in-toto Statement v1."""

PREDICATE_TYPE = "https://fedforget.dev/erasure-receipt/v2"
"""The one predicate version this code writes and accepts (v1: Python's sorted-key JSON and
version 1 tree heads; v2: RFC 8785 canonical JSON, version 2 tree heads that also commit to
the withdrawal ledger)."""

_OLDER_PREDICATES = ("https://fedforget.dev/erasure-receipt/v1",)

UNLEARNED_SUBJECT = "unlearned-model"
ORIGINAL_SUBJECT = "original-model"

COMMITMENT_SCHEME = "sha256(salt || utf8(client-id)), 32-byte salt"
"""How ``withdrawn-client.commitment`` is computed."""

_STATEMENT_FIELDS = ("_type", "predicate", "predicateType", "subject")
_SUBJECT_FIELDS = ("digest", "name")
_PREDICATE_FIELDS = (
    "comparison",
    "history",
    "issued-at",
    "issuer",
    "method",
    "previous-receipt",
    "receipt-id",
    "request",
    "rounds-affected",
    "signer-key-id",
    "withdrawn-client",
)
_REQUEST_FIELDS = ("id", "reason", "received-at")
_CLIENT_FIELDS = ("commitment", "scheme")
_HISTORY_FIELDS = ("consistency", "root", "tree-size")
_CONSISTENCY_FIELDS = ("from-head", "proof")
_METHOD_FIELDS = ("name", "parameters", "seeds", "version")
_COMPARISON_FIELDS = ("metrics", "retrained-model")
_SCOPE_KINDS = {"records": ("kind", "records"), "class": ("kind", "labels")}
_RECORDS_FIELDS = ("count", "root", "scheme")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", re.ASCII)


def decimal_string(value: object, what: str = "metric") -> str:
    """A metric as a plain decimal string: ``0.1`` → ``"0.1"``, ``1e-05`` → ``"0.00001"``.

    Floats are written through their shortest round-trip representation, so the string is
    exactly the float the caller had.

    Raises
    ------
    PredicateError
        If ``value`` is not a finite number or a decimal string.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise PredicateError(f"{what} is {value!r}; expected a number or a decimal string")
    else:
        try:
            number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        except InvalidOperation as exc:  # pragma: no cover - repr of a float always parses
            raise PredicateError(f"{what} is {value!r}; expected a finite number") from exc
        if not number.is_finite():
            raise PredicateError(f"{what} is {value!r}; expected a finite number")
        text = format(number, "f")
        if text.startswith("-") and _DECIMAL.fullmatch(text[1:]) and Decimal(text) == 0:
            text = text[1:]
    if _DECIMAL.fullmatch(text) is None:
        raise PredicateError(
            f"{what} is {text!r}; expected a decimal string such as '0.9125' or '-3'"
        )
    return text


@dataclass(frozen=True, slots=True)
class Consistency:
    """A consistency proof from a client's saved head to the cited history.

    Attributes
    ----------
    from_head
        The signed head the client saved.
    proof
        RFC 9162 consistency proof, hex hashes.
    """

    from_head: TreeHead
    proof: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"from-head": self.from_head.to_dict(), "proof": list(self.proof)}


@dataclass(frozen=True, slots=True)
class HistoryCommitment:
    """The history a receipt cites: tree size and root, and optionally a consistency proof.

    Attributes
    ----------
    size
        Number of committed rounds.
    root
        Hex MTH over their canonical record bytes.
    consistency
        Proof from the withdrawn client's saved head, when it has one.
    """

    size: int
    root: str
    consistency: Consistency | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "tree-size": self.size,
            "root": self.root,
            "consistency": None if self.consistency is None else self.consistency.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    """The unlearned model measured against the model retrained without the client.

    Attributes
    ----------
    retrained_model_digest
        ``"sha256:<hex>"`` of the retrained model's fp32 encoding.
    metrics
        Metric name → value; values are written as decimal strings.
    """

    retrained_model_digest: str
    metrics: Mapping[str, float | int | str | Decimal] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, metrics as decimal strings."""
        return {
            "retrained-model": self.retrained_model_digest,
            "metrics": {
                str(k): decimal_string(v, f"comparison metric {k!r}")
                for k, v in self.metrics.items()
            },
        }


@dataclass(frozen=True, slots=True)
class ErasureStatement:
    """A parsed, schema-checked erasure-receipt statement (its signature checked elsewhere)."""

    unlearned_model: str
    original_model: str
    receipt_id: str
    issued_at: str
    issuer: str
    signer_key_id: str
    request_id: str
    received_at: str
    reason: str
    client_commitment: str
    rounds_affected: tuple[int, ...]
    history: HistoryCommitment
    method: str
    method_version: str
    parameters: Mapping[str, Any]
    seeds: Mapping[str, int]
    comparison: Comparison | None
    previous_receipt: str | None
    statement: Mapping[str, Any]
    scope: Mapping[str, Any] | None = None  # record- or class-level requests only


def _subject(data: object, index: int, name: str) -> str:
    where = f"subject {index}"
    fields = require_fields(data, where, StatementError, _SUBJECT_FIELDS)
    if fields["name"] != name:
        raise StatementError(f"{where} is named {fields['name']!r}; expected {name!r}")
    digest = require_fields(fields["digest"], f"{where} digest", StatementError, ("sha256",))
    hexdigest = require_hex64(digest["sha256"], f"{where} digest sha256", StatementError)
    return "sha256:" + hexdigest


def _consistency(data: object) -> Consistency | None:
    where = "predicate.history.consistency"
    if data is None:
        return None
    fields = require_fields(data, where, PredicateError, _CONSISTENCY_FIELDS)
    try:
        head = TreeHead.from_dict(fields["from-head"], f"{where}.from-head")
    except TreeHeadError as exc:
        raise PredicateError(exc.detail) from None
    proof = fields["proof"]
    if not isinstance(proof, list):
        raise PredicateError(f"{where}.proof is {proof!r}; expected a list of hex hashes")
    hashes = tuple(
        require_hex64(p, f"{where}.proof[{i}]", PredicateError) for i, p in enumerate(proof)
    )
    return Consistency(head, hashes)


def _history(data: object) -> HistoryCommitment:
    where = "predicate.history"
    fields = require_fields(data, where, PredicateError, _HISTORY_FIELDS)
    size = require_int(fields["tree-size"], f"{where}.tree-size", PredicateError)
    root = require_hex64(fields["root"], f"{where}.root", PredicateError)
    return HistoryCommitment(size, root, _consistency(fields["consistency"]))


def _rounds(data: object, size: int) -> tuple[int, ...]:
    where = "predicate.rounds-affected"
    if not isinstance(data, list):
        raise PredicateError(f"{where} is {data!r}; expected a list of round numbers")
    rounds = tuple(
        require_int(r, f"{where}[{i}]", PredicateError, minimum=1) for i, r in enumerate(data)
    )
    if list(rounds) != sorted(set(rounds)):
        raise PredicateError(f"{where} is {list(rounds)}; expected increasing round numbers")
    if rounds and rounds[-1] > size:
        raise PredicateError(
            f"{where} names round {rounds[-1]}, but the cited history has {size} rounds"
        )
    return rounds


def _json_mapping(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise PredicateError(f"{where} is {data!r}; expected a JSON object")
    return MappingProxyType(dict(data))


def _seeds(data: object) -> Mapping[str, int]:
    where = "predicate.method.seeds"
    mapping = _json_mapping(data, where)
    for name, seed in mapping.items():
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise PredicateError(f"{where}.{name} is {seed!r}; expected an integer")
    return mapping


def _comparison(data: object) -> Comparison | None:
    where = "predicate.comparison"
    if data is None:
        return None
    fields = require_fields(data, where, PredicateError, _COMPARISON_FIELDS)
    digest = require_digest(fields["retrained-model"], f"{where}.retrained-model", PredicateError)
    metrics = _json_mapping(fields["metrics"], f"{where}.metrics")
    for name, value in metrics.items():
        if not name:
            raise PredicateError(f"{where}.metrics has an empty metric name")
        if not isinstance(value, str) or _DECIMAL.fullmatch(value) is None:
            raise PredicateError(
                f"{where}.metrics.{name} is {value!r}; expected a decimal string"
            )
    return Comparison(digest, metrics)


def _scope(data: object) -> Mapping[str, Any]:
    where = "predicate.scope"
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in _SCOPE_KINDS:
        raise PredicateError(f"{where}.kind is {kind!r}; expected 'records' or 'class'")
    fields = require_fields(data, where, PredicateError, _SCOPE_KINDS[kind])
    if kind == "records":
        records = require_fields(fields["records"], f"{where}.records", PredicateError,
                                 _RECORDS_FIELDS)
        require_int(records["count"], f"{where}.records.count", PredicateError, minimum=1)
        require_hex64(records["root"], f"{where}.records.root", PredicateError)
        require_str(records["scheme"], f"{where}.records.scheme", PredicateError)
    else:
        labels = fields["labels"]
        if not isinstance(labels, list) or not labels:
            raise PredicateError(f"{where}.labels is {labels!r}; expected a list of labels")
        values = [require_int(v, f"{where}.labels[{i}]", PredicateError)
                  for i, v in enumerate(labels)]
        if values != sorted(set(values)):
            raise PredicateError(f"{where}.labels is {values}; expected increasing labels")
    return MappingProxyType(dict(fields))


def parse_statement(payload: bytes) -> ErasureStatement:
    """Parse and schema-check the payload of an erasure receipt.

    Raises
    ------
    StatementError
        If the payload is not canonical JSON of an in-toto Statement v1 with exactly the
        subjects ``unlearned-model`` and ``original-model``.
    PredicateVersionError
        If ``predicateType`` is not :data:`PREDICATE_TYPE`.
    PredicateError
        If a predicate field is unknown, missing, or malformed.
    """
    data = parse_canonical_json(payload, "payload", StatementError)
    fields = require_fields(data, "statement", StatementError, _STATEMENT_FIELDS)
    if fields["_type"] != STATEMENT_TYPE:
        raise StatementError(f"_type is {fields['_type']!r}; expected {STATEMENT_TYPE!r}")
    if fields["predicateType"] != PREDICATE_TYPE:
        older = (
            " (an older receipt version: its bytes were not RFC 8785 canonical JSON and its "
            "tree heads did not bind the withdrawal ledger; this fedforget verifies "
            "version 2 only)" if fields["predicateType"] in _OLDER_PREDICATES else ""
        )
        raise PredicateVersionError(
            f"predicateType is {fields['predicateType']!r}; expected {PREDICATE_TYPE!r}"
            + older
        )
    subjects = fields["subject"]
    if not isinstance(subjects, list) or len(subjects) != 2:
        raise StatementError(
            f"subject is {subjects!r}; expected the two subjects {UNLEARNED_SUBJECT!r} and "
            f"{ORIGINAL_SUBJECT!r}"
        )
    unlearned = _subject(subjects[0], 0, UNLEARNED_SUBJECT)
    original = _subject(subjects[1], 1, ORIGINAL_SUBJECT)

    optional = ("scope",) if isinstance(fields["predicate"], dict) and \
        "scope" in fields["predicate"] else ()
    p = require_fields(fields["predicate"], "predicate", PredicateError,
                       _PREDICATE_FIELDS + optional)
    receipt_id = require_str(p["receipt-id"], "predicate.receipt-id", PredicateError)
    issued_at = p["issued-at"]
    parse_utc(issued_at, "predicate.issued-at", PredicateError)
    issuer = require_str(p["issuer"], "predicate.issuer", PredicateError)
    signer = require_hex64(p["signer-key-id"], "predicate.signer-key-id", PredicateError)

    request = require_fields(p["request"], "predicate.request", PredicateError, _REQUEST_FIELDS)
    request_id = require_str(request["id"], "predicate.request.id", PredicateError)
    received_at = request["received-at"]
    parse_utc(received_at, "predicate.request.received-at", PredicateError)
    reason = require_str(request["reason"], "predicate.request.reason", PredicateError, empty=True)

    client = require_fields(
        p["withdrawn-client"], "predicate.withdrawn-client", PredicateError, _CLIENT_FIELDS
    )
    if client["scheme"] != COMMITMENT_SCHEME:
        raise PredicateError(
            f"predicate.withdrawn-client.scheme is {client['scheme']!r}; expected "
            f"{COMMITMENT_SCHEME!r}"
        )
    commitment = require_digest(
        client["commitment"], "predicate.withdrawn-client.commitment", PredicateError
    )

    history = _history(p["history"])
    rounds = _rounds(p["rounds-affected"], history.size)

    method = require_fields(p["method"], "predicate.method", PredicateError, _METHOD_FIELDS)
    method_name = require_str(method["name"], "predicate.method.name", PredicateError)
    method_version = require_str(method["version"], "predicate.method.version", PredicateError)
    parameters = _json_mapping(method["parameters"], "predicate.method.parameters")
    seeds = _seeds(method["seeds"])

    comparison = _comparison(p["comparison"])
    previous = p["previous-receipt"]
    if previous is not None:
        require_digest(previous, "predicate.previous-receipt", PredicateError)

    return ErasureStatement(
        unlearned_model=unlearned,
        original_model=original,
        receipt_id=receipt_id,
        issued_at=issued_at,
        issuer=issuer,
        signer_key_id=signer,
        request_id=request_id,
        received_at=received_at,
        reason=reason,
        client_commitment=commitment,
        rounds_affected=rounds,
        history=history,
        method=method_name,
        method_version=method_version,
        parameters=parameters,
        seeds=seeds,
        comparison=comparison,
        previous_receipt=previous,
        statement=MappingProxyType(data),
        scope=_scope(p["scope"]) if optional else None,
    )


def statement_payload(statement: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes of a statement dict (the DSSE payload)."""
    return canonical_json(dict(statement), PredicateError)

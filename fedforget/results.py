"""The typed record of one unlearning result (``result.json``) and of a cached reference.

Written by the unlearning service (:mod:`fedforget.service`) into the result directory it
stages and commits, read back by the CLI, the experiment runner and ``history verify``
through :meth:`UnlearningOutcome.read` — never as a dict read by string keys. Paths inside
are relative to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedforget.cost import Cost
from fedforget.errors import FedForgetError

__all__ = [
    "ReceiptInfo",
    "ReferenceInfo",
    "ReferenceRecord",
    "ResultError",
    "UnlearningOutcome",
]

RESULT_VERSION = 1
"""Version of the ``result.json`` schema written by this module."""


class ResultError(FedForgetError):
    """A result file is missing, unreadable or not of the expected schema."""


def _from_dict(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(f.name for f in fields(cls) if f.name not in data
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        raise ResultError(f"{where}: unexpected fields {unknown}, missing fields {missing}")
    return dict(data)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ResultError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ResultError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class ReceiptInfo:
    """Where the receipt of a result is, and what the client needs to check it."""

    receipt_id: str
    receipt_path: str  # relative to the run directory (receipts/<id>.json)
    public_key_path: str  # absolute: keys may live outside the run directory
    salt_outbox: str  # the server's copy of the salt until the client has it (relative)
    head_path: str | None  # the head the client kept, that the consistency proof starts at


@dataclass(frozen=True)
class ReferenceInfo:
    """The retrained reference a result was compared with."""

    status: str  # "computed", "cached" or "none"
    model_digest: str | None = None
    cost: Cost | None = None
    bit_identical: bool | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceInfo:
        """Inverse of ``dataclasses.asdict``."""
        values = _from_dict(cls, data, "reference")
        if values.get("cost") is not None:
            values["cost"] = Cost(**values["cost"])
        return cls(**values)


@dataclass(frozen=True)
class UnlearningOutcome:
    """One unlearning result: what was forgotten, how, at what cost, compared how.

    ``metrics`` is the evaluation protocol's output (see :mod:`fedforget.measure`): a JSON
    object whose figures depend on what the app can measure.
    """

    method: str
    method_version: str
    exact: bool
    params: dict[str, Any]
    seed: int
    engine: str
    request_id: str
    client_id: str
    received_at: str  # when the withdrawal request arrived
    reason: str  # the reason the client gave
    forgotten: list[str]
    original_model_digest: str
    starting_model_digest: str | None
    model_path: str
    model_digest: str
    reference: ReferenceInfo
    cost: Cost
    rounds_affected: list[int]
    metrics: dict[str, Any]
    finished_at: str
    receipt: ReceiptInfo | None = None
    notes: list[str] = field(default_factory=list)
    history_dir: str | None = None
    version: int = RESULT_VERSION
    kind: str = "client"  # the size of the request: client, records or class
    # what the record and class requests in force forget (ErasureScope.to_dict), if any
    scope: dict[str, Any] | None = None
    # the process that computed it (fedforget.environment.compute_environment; None:
    # recorded before this field was kept)
    environment: dict[str, str] | None = None

    # --------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "result") -> UnlearningOutcome:
        """Inverse of :meth:`to_dict`; a missing or unexpected field is a ResultError."""
        values = _from_dict(cls, data, where)
        if values.get("version", RESULT_VERSION) != RESULT_VERSION:
            raise ResultError(f"{where}: result version {values['version']!r}; this fedforget "
                              f"reads version {RESULT_VERSION}")
        try:
            values["reference"] = ReferenceInfo.from_dict(values["reference"])
            values["cost"] = Cost(**values["cost"])
            if values.get("receipt") is not None:
                values["receipt"] = ReceiptInfo(**values["receipt"])
        except (TypeError, ResultError) as exc:
            raise ResultError(f"{where}: {exc}") from None
        return cls(**values)

    def write(self, path: Path) -> Path:
        """Write as ``result.json`` (into a staging directory: not atomic by itself)."""
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False))
        return path

    @classmethod
    def read(cls, path: str | Path) -> UnlearningOutcome:
        """Read a ``result.json``."""
        return cls.from_dict(_read_json(Path(path)), where=str(path))

    def with_receipt(self, receipt: ReceiptInfo) -> UnlearningOutcome:
        """A copy that names its receipt."""
        return dataclasses.replace(self, receipt=receipt)

    def reference_key(self) -> list[str]:
        """What the retrained reference of this result forgot: the clients and the record /
        class tokens in force (the key of ``RunDirectory.reference_dir``)."""
        return sorted(set(self.forgotten) | set((self.scope or {}).get("tokens", [])))

    @property
    def bit_identical(self) -> bool | None:
        """Whether the model equals the retrained reference bit for bit (None: no reference)."""
        return self.reference.bit_identical


@dataclass(frozen=True)
class ReferenceRecord:
    """A cached retrained reference (``unlearned/reference-<key>/result.json``)."""

    forgotten: list[str]
    model_path: str  # relative to the reference directory
    model_digest: str
    cost: Cost
    rounds_affected: list[int]
    history_dir: str | None  # relative to the reference directory
    notes: list[str] = field(default_factory=list)
    # the history it was retrained from: its last round and final model (a reference is
    # valid for a later request only while the history is unchanged; None: not recorded)
    trained_rounds: int | None = None
    original_model_digest: str | None = None
    scope: dict[str, Any] | None = None  # records and classes it was trained without
    # the process that retrained it (fedforget.environment.compute_environment; None:
    # recorded before this field was kept)
    environment: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)

    def valid_for(self, *, rounds: int, original_model_digest: str) -> bool:
        """Whether this reference is the retrained model of a history that ends at round
        ``rounds`` with the model ``original_model_digest`` (a reference recorded before
        these fields were kept counts as valid when its replay covered as many rounds)."""
        if self.original_model_digest is not None:
            return (self.trained_rounds == rounds
                    and self.original_model_digest == original_model_digest)
        return bool(self.rounds_affected) and max(self.rounds_affected) == rounds

    def write(self, path: Path) -> Path:
        """Write as the reference's ``result.json``."""
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False))
        return path

    @classmethod
    def read(cls, path: str | Path) -> ReferenceRecord:
        """Read a reference's ``result.json``."""
        values = _from_dict(cls, _read_json(Path(path)), str(path))
        try:
            values["cost"] = Cost(**values["cost"])
        except TypeError as exc:
            raise ResultError(f"{path}: {exc}") from None
        return cls(**values)

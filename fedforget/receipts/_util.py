"""Private helpers shared by the receipt modules: canonical JSON, strict base64, times."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedforget.canonical import canonical_dumps
from fedforget.fileio import write_new
from fedforget.receipts.errors import ReceiptError

_RFC3339_UTC = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z", re.ASCII
)
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)



def canonical_json(obj: Any, error: type[ReceiptError] = ReceiptError) -> bytes:
    """RFC 8785 canonical JSON (:func:`fedforget.canonical.canonical_dumps`); a value it
    cannot represent raises ``error``."""
    try:
        return canonical_dumps(obj)
    except (TypeError, ValueError) as exc:
        raise error(f"value cannot be written as canonical JSON: {exc}") from exc


def parse_canonical_json(data: bytes, what: str, error: type[ReceiptError]) -> Any:
    """Parse ``data`` and insist that it is exactly the canonical form of what it holds."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not UTF-8 JSON: {exc}") from exc
    if canonical_json(parsed, error) != data:
        raise error(
            f"{what} is not RFC 8785 canonical JSON (sorted keys, no spaces, UTF-8, "
            "ECMAScript numbers); it was altered or not written by this fedforget"
        )
    return parsed


def b64encode(data: bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object, what: str, error: type[ReceiptError]) -> bytes:
    """Decode standard or URL-safe base64 (DSSE allows both); refuse non-canonical text.

    Non-canonical text (stray padding bits, missing padding, other characters) is refused so
    that no two different strings decode to the same bytes.
    """
    if not isinstance(value, str) or not value.isascii():
        raise error(f"{what} is {value!r}; expected a base64 string")
    urlsafe = "-" in value or "_" in value
    try:
        raw = base64.b64decode(value, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error(f"{what} is not valid base64: {exc}") from exc
    again = base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)
    if again.decode("ascii") != value:
        raise error(f"{what} is not canonical base64 (padding or unused bits differ)")
    return raw


def utc_now() -> str:
    """The current time as RFC 3339 UTC with microseconds, e.g. ``2025-01-31T12:00:00.000001Z``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_utc(value: object, what: str, error: type[ReceiptError]) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time such as ``2025-01-31T12:00:00Z``.

    Only the ``Z`` form is accepted (one spelling per instant, so times compare as numbers).
    """
    match = _RFC3339_UTC.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise error(
            f"{what} is {value!r}; expected RFC 3339 UTC such as '2025-01-31T12:00:00.000001Z'"
        )
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError as exc:
        raise error(f"{what} is {value!r}, which is not a valid date and time: {exc}") from exc
    nanos = int((fraction or "").ljust(9, "0"))
    return int(moment.timestamp()) * 1_000_000_000 + nanos


def require_str(value: object, what: str, error: type[ReceiptError], *, empty: bool = False) -> str:
    """``value`` if it is a string (non-empty unless ``empty``), else ``error``."""
    if not isinstance(value, str) or (not empty and not value):
        kind = "a string" if empty else "a non-empty string"
        raise error(f"{what} is {value!r}; expected {kind}")
    return value


def require_int(value: object, what: str, error: type[ReceiptError], *, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else ``error``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise error(f"{what} is {value!r}; expected an integer >= {minimum}")
    return value


def require_hex64(value: object, what: str, error: type[ReceiptError]) -> str:
    """``value`` if it is 64 lower-case hex digits (a SHA-256), else ``error``."""
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise error(f"{what} is {value!r}; expected 64 lower-case hex digits")
    return value


def require_digest(value: object, what: str, error: type[ReceiptError]) -> str:
    """``value`` if it reads ``sha256:`` and 64 lower-case hex digits, else ``error``."""
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        raise error(f"{what} is {value!r}; expected 'sha256:' and 64 lower-case hex digits")
    return value


def require_fields(
    value: object,
    where: str,
    error: type[ReceiptError],
    required: tuple[str, ...],
) -> Mapping[str, Any]:
    """``value`` if it is an object with exactly the ``required`` keys.

    Raises ``error`` naming the first unknown field (in sorted order) or the first missing one.
    """
    if not isinstance(value, dict):
        raise error(f"{where} is {type(value).__name__} {value!r}; expected a JSON object")
    for key in sorted(value):
        if key not in required:
            raise error(f"unknown field {key!r} in {where}")
    for key in required:
        if key not in value:
            raise error(f"missing field {key!r} in {where}")
    return value


def write_new_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically, refusing to replace an existing file
    (:func:`fedforget.fileio.write_new`).

    Raises
    ------
    FileExistsError
        If ``path`` exists.
    StorageError
        If it cannot be written (nothing is left behind).
    """
    return write_new(path, data, mode=mode)

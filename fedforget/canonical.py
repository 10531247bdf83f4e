"""The one canonical JSON encoding of everything fedforget hashes or signs: RFC 8785.

Round records (the Merkle leaves), withdrawal-ledger events, tree heads, receipts and key
manifests are written as the JSON Canonicalization Scheme (JCS, RFC 8785,
https://www.rfc-editor.org/rfc/rfc8785), through the ``rfc8785`` package: object members
sorted by the UTF-16 code units of their names, no white space, UTF-8, strings with the
minimal escapes of ECMAScript's ``JSON.stringify``, numbers in ECMAScript's shortest
round-trip form (``1.0`` is ``1``, ``1e21`` is ``1e+21``). A verifier in any language with a
JCS implementation recomputes the same bytes, hence the same digests and Merkle roots.

What JCS cannot represent is refused rather than written in some other way: NaN and the
infinities, integers outside :math:`\\pm(2^{53} - 1)` (a JSON number is an IEEE double;
fedforget writes its 63-bit seeds as decimal strings for that reason), object keys that are
not strings, and strings that are not valid Unicode (lone surrogates). NumPy scalars are
written as the Python numbers they hold; tuples as arrays.

Speed: ``rfc8785`` is pure Python (about 250 µs for a 3 KiB round record, several per round).
Where a value holds only the types on which the standard library's C JSON encoder already
writes the JCS bytes, :func:`canonical_dumps` uses that encoder instead (about 50 µs):
``dict`` with ASCII ``str`` keys (code-point order is then UTF-16 order), ``list`` / ``tuple``,
``str``, ``bool``, ``None``, ``int`` within :math:`\\pm(2^{53} - 1)`, and finite ``float``
whose ``repr`` has neither an exponent nor a trailing ``.0`` (Python's shortest round-trip
digits are ECMAScript's; only the exponent range and ``1.0`` / ``-0.0`` differ). The string
escapes agree (quote and backslash escaped with a backslash; backspace, form feed, line
feed, carriage return and tab by their short escapes; other control characters as lower-case
``\\u00xx``; nothing else escaped). Anything else, and any string that is not valid UTF-8,
goes through ``rfc8785``. ``tests/test_canonical.py`` checks the two paths give the same
bytes (or both refuse) on generated values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import rfc8785

__all__ = ["CanonicalJSONError", "canonical_dumps", "jcs_ready"]


class CanonicalJSONError(ValueError):
    """A value that RFC 8785 canonical JSON cannot represent (the message says which)."""


def jcs_ready(obj: Any, where: str = "value") -> Any:
    """``obj`` as plain JSON types (dict, list, str, int, float, bool, None).

    NumPy scalars become Python numbers, tuples and lists become lists, mappings become
    dicts. Anything else is refused.

    Raises
    ------
    CanonicalJSONError
        If ``obj`` holds a value that is not JSON, naming where it is.
    """
    if isinstance(obj, np.generic):
        return jcs_ready(obj.item(), where)
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise CanonicalJSONError(
                    f"{where} has key {key!r} ({type(key).__name__}); expected string keys"
                )
            out[key] = jcs_ready(value, f"{where}.{key}")
        return out
    if isinstance(obj, list | tuple):
        return [jcs_ready(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    raise CanonicalJSONError(f"{where} is a {type(obj).__name__}, which is not JSON")


_MAX_EXACT_INT = 2**53 - 1
_MAX_DEPTH = 200


def _plain(obj: Any) -> bool:
    """Whether the C JSON encoder writes ``obj`` in RFC 8785 form (see the module docstring)."""
    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        t = type(x)
        if t is str or t is bool or x is None:
            continue
        if t is int:
            if -_MAX_EXACT_INT <= x <= _MAX_EXACT_INT:
                continue
            return False
        if t is float:
            if not math.isfinite(x):
                return False
            r = repr(x)
            if "e" in r or r.endswith(".0"):
                return False
            continue
        if depth >= _MAX_DEPTH:  # a cycle, or deeper than the encoder should go
            return False
        if t is dict:
            for key in x:
                if type(key) is not str or not key.isascii():
                    return False
            stack.extend([(v, depth + 1) for v in x.values()])
            continue
        if t is list or t is tuple:
            stack.extend([(v, depth + 1) for v in x])
            continue
        return False
    return True


def _fast_dumps(obj: Any) -> bytes | None:
    """The standard library's bytes for a :func:`_plain` value, or None to take ``rfc8785``."""
    if not _plain(obj):
        return None
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError, RecursionError):
        return None


def canonical_dumps(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes of ``obj``.

    Raises
    ------
    CanonicalJSONError
        If ``obj`` holds a value RFC 8785 cannot represent: NaN or an infinity, an integer
        beyond :math:`\\pm(2^{53} - 1)`, a non-string key, a lone surrogate, or a non-JSON
        object. (A subclass of :class:`ValueError`; callers map it to their own error type.)
    """
    fast = _fast_dumps(obj)
    if fast is not None:
        return fast
    try:
        ready = jcs_ready(obj)
    except RecursionError:
        raise CanonicalJSONError("value is nested too deeply for JSON or contains itself") from None
    try:
        return rfc8785.dumps(ready)
    except rfc8785.IntegerDomainError as exc:
        raise CanonicalJSONError(
            f"{exc}: RFC 8785 numbers are IEEE doubles, integers beyond 2**53 - 1 are "
            "not exact (write them as decimal strings)"
        ) from None
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalJSONError(f"not representable as RFC 8785 JSON: {exc}") from None

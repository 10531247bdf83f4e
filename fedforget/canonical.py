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
"""

from __future__ import annotations

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


def canonical_dumps(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes of ``obj``.

    Raises
    ------
    CanonicalJSONError
        If ``obj`` holds a value RFC 8785 cannot represent: NaN or an infinity, an integer
        beyond :math:`\\pm(2^{53} - 1)`, a non-string key, a lone surrogate, or a non-JSON
        object. (A subclass of :class:`ValueError`; callers map it to their own error type.)
    """
    ready = jcs_ready(obj)
    try:
        return rfc8785.dumps(ready)
    except rfc8785.IntegerDomainError as exc:
        raise CanonicalJSONError(
            f"{exc}: RFC 8785 numbers are IEEE doubles, integers beyond 2**53 - 1 are "
            "not exact (write them as decimal strings)"
        ) from None
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalJSONError(f"not representable as RFC 8785 JSON: {exc}") from None

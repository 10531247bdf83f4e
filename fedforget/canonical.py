"""The one canonical JSON encoding used for everything that is hashed or signed.

Sorted keys, compact separators, UTF-8 (no ASCII escaping), NaN and infinities refused,
NumPy scalars written as the Python numbers they hold. Round records (Merkle leaves),
tree heads and receipts all use it, so the same value always hashes the same way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def canonical_dumps(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj``.

    Raises
    ------
    TypeError, ValueError
        If ``obj`` holds a value JSON cannot represent (callers map these to their own
        error type).
    """
    text = json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )
    return text.encode("utf-8")

"""Read-only mappings of stored blobs, kept between readers (see
:mod:`fedforget.history.views`): up to :data:`MAPPING_CACHE_BYTES` in all, least recently
used first out, at most :data:`MAPPING_CACHE_COUNT` of them, each used again only while its
file has the identity it had when mapped.
:meth:`HistoryStore.close <fedforget.history.store.HistoryStore.close>` releases a store's.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import OrderedDict

__all__ = ["MAPPING_CACHE_BYTES", "MAPPING_CACHE_COUNT", "drop_mapping", "map_blob",
           "release_mappings"]

MAPPING_CACHE_BYTES = 1 << 30
"""Bytes of blob mappings kept between uses (see the module); 0 keeps none."""

MAPPING_CACHE_COUNT = 128
"""Mappings kept at most: on Python before 3.13 each mapping holds a duplicate of its file
descriptor, so the count is bounded well below the usual limit of 1,024 open files."""

_mappings: OrderedDict[tuple[str, int, int], tuple[tuple[int, ...], mmap.mmap]] = OrderedDict()
"""Kept mappings: (file, start, length) -> (the file's identity when mapped, the mapping)."""
_mapped_bytes = 0
_mappings_lock = threading.Lock()


def map_blob(fd: int, path: str, start: int, length: int,
             identity: tuple[int, ...]) -> tuple[mmap.mmap, bool]:
    """A read-only mapping of ``length`` bytes of ``fd`` from ``start``: a kept one where
    the file still has ``identity``, else a new one (kept where the budget allows).
    Returns the mapping and whether it is kept (the caller must not close a kept one)."""
    global _mapped_bytes
    key = (path, start, length)
    with _mappings_lock:
        entry = _mappings.get(key)
        if entry is not None:
            if entry[0] == identity:
                _mappings.move_to_end(key)
                return entry[1], True
            _drop(key)
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mapping = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ, offset=start)
    if length > MAPPING_CACHE_BYTES:
        return mapping, False
    with _mappings_lock:
        if key in _mappings:  # another thread mapped it meanwhile: keep one
            _drop(key)
        _mappings[key] = (identity, mapping)
        _mapped_bytes += length
        while _mapped_bytes > MAPPING_CACHE_BYTES or len(_mappings) > MAPPING_CACHE_COUNT:
            _drop(next(iter(_mappings)))
    return mapping, True


def _drop(key: tuple[str, int, int]) -> None:
    """Forget a kept mapping (lock held); unmapped now, or with the last view of it."""
    global _mapped_bytes
    _, mapping = _mappings.pop(key)
    _mapped_bytes -= key[2]
    with contextlib.suppress(BufferError):  # still viewed: it goes with its last view
        mapping.close()


def release_mappings(under: str | os.PathLike[str] | None = None) -> None:
    """Unmap the kept mappings of the files under the directory ``under`` (default: all).
    A mapping still viewed by an open blob goes with its last view."""
    prefix = None if under is None else os.path.join(os.fspath(under), "")
    with _mappings_lock:
        for key in [k for k in _mappings if prefix is None or k[0].startswith(prefix)]:
            _drop(key)


def drop_mapping(path: str, start: int, length: int) -> None:
    """Forget the kept mapping of ``length`` bytes of ``path`` from ``start``, if any."""
    with _mappings_lock:
        if (path, start, length) in _mappings:
            _drop((path, start, length))

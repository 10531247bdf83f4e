"""Zero-copy, digest-checked views of stored blobs, for methods that read many of them.

:meth:`HistoryStore.client_update <fedforget.history.store.HistoryStore.client_update>` reads a
blob, hashes it and decodes a copy of every tensor before the caller can use any of it: the
SHA-256 (about 1–2 GB/s on one core) then caps every server-side method well below memory
bandwidth, and each read allocates new arrays. :class:`BlobViews` serves the same bytes for a
method that combines many blobs (the subtraction-type methods):

* large blobs are memory-mapped from their pack file (``MAP_POPULATE``) and their tensors
  are read-only NumPy views of the mapping, without a copy where the codec stores what
  the caller reads (fp32; fp16 and bf16 are widened by the caller, chunk by chunk);
  small blobs are read with one ``pread``;
* every blob is checked against its digest, on a thread pool (``hashlib`` releases the GIL)
  while the caller already computes with it; :meth:`BlobViews.check` waits for the digests
  and raises :class:`~fedforget.errors.IntegrityError` on the first mismatch, so a caller that
  calls it before handing out a result fails closed, as a plain read does;
* ``verify="once"`` (the default) hashes a blob once per process: a blob whose pack file is
  unchanged since this process last verified it (same device, inode, size, modification and
  status-change times, hence not written through the file system since) is not hashed
  again. File times have the resolution of a clock tick (milliseconds), so a verification
  is only remembered for a file whose last change is at least :data:`SETTLED_SECONDS` old:
  a write in the same tick as that change cannot hide behind an equal time stamp. A fresh
  process (``fedforget unlearn``) hashes everything it reads.
  ``verify="always"`` hashes on every use.

A file changed while it is mapped is refused at :meth:`BlobViews.check` (its status-change
time moves).

Mappings are kept between uses (:mod:`fedforget.history.mappings`), up to
:data:`~fedforget.history.mappings.MAPPING_CACHE_BYTES` in all (least recently
used first out): a method that reads the same blobs again in this process (a second method
or request on the same history) finds them mapped, without the page-table work of mapping
and unmapping them again (about 0.3 ms per 8 MB blob on the development machine, a sixth of
a warm subtraction on a 2 M-parameter model). A kept mapping is used again only while its
file has the identity it had when mapped (device, inode, size, times); what it shows is the
file's current bytes either way (a shared mapping of the page cache), and the digest checks
do not depend on it. :meth:`HistoryStore.close <fedforget.history.store.HistoryStore.close>`
unmaps the store's (:func:`release_mappings`).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedforget.errors import ConfigError, IntegrityError
from fedforget.history.mappings import drop_mapping, map_blob, release_mappings
from fedforget.tensors import StoredTensor, blob_layout

if TYPE_CHECKING:
    from fedforget.history.store import BlobLocation, HistoryStore

__all__ = ["BlobViews", "StoredBlob", "VERIFY_MODES", "release_mappings"]

VERIFY_MODES = ("once", "always")

SETTLED_SECONDS = 2.0
"""A verification is remembered only for a file unchanged for this long (see the module)."""

MAP_THRESHOLD = 1 << 20
"""Blobs at least this large are memory-mapped; smaller ones are read with ``pread``."""

_VERIFIED_MAX = 1 << 16
_verified: OrderedDict[tuple[Any, ...], None] = OrderedDict()
"""Blobs this process verified: (digest, device, inode, size, mtime_ns, ctime_ns, offset,
length) of the pack file it lies in. Bounded; the oldest entries are forgotten first."""


def _identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def forget_verified() -> None:
    """Forget which blobs this process verified (every blob is hashed again)."""
    _verified.clear()


@dataclass
class StoredBlob:
    """One blob as :class:`BlobViews` serves it: its bytes (a mapping or a copy), codec and
    tensor layout. Its digest may still be being checked (see :meth:`BlobViews.check`)."""

    digest: str
    where: str
    location: BlobLocation
    buffer: memoryview
    codec: str
    tensors: tuple[StoredTensor, ...]
    identity: tuple[int, int, int, int, int]
    _mapping: mmap.mmap | None = None
    _kept: bool = False  # the mapping is a kept one (see the module): not closed on release
    _check: Future[str] | None = None
    _views: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def hashing(self) -> bool:
        """Whether this blob's digest is still being computed on the hash pool."""
        return self._check is not None and not self._check.done()

    def view(self, tensor: StoredTensor) -> np.ndarray:
        """The stored values of ``tensor`` (a read-only view of the blob's bytes)."""
        return tensor.view(self.buffer)

    def views(self) -> dict[str, np.ndarray]:
        """Name -> stored values of every tensor, in the blob's order (read-only views)."""
        return {t.name: t.view(self.buffer) for t in self.tensors}


class BlobViews:
    """Read many stored blobs of a history without copying them (see the module).

    Parameters
    ----------
    store : HistoryStore
        The (open) history the blobs belong to.
    workers : int
        Threads that hash blobs while the caller computes.
    verify : str
        ``"once"`` (default) or ``"always"``: see the module.

    The object is a context manager; leaving it releases every mapping. Arrays obtained
    from it must not be used after :meth:`release` or :meth:`close`.
    """

    def __init__(self, store: HistoryStore, *, workers: int = 2, verify: str = "once") -> None:
        if verify not in VERIFY_MODES:
            raise ConfigError(f"verify = {verify!r}; expected one of {', '.join(VERIFY_MODES)}")
        if workers < 1:
            raise ConfigError(f"workers = {workers!r}; expected an integer >= 1")
        self._store = store
        self._verify = verify
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._open: list[StoredBlob] = []
        self._locations: dict[str, BlobLocation] = {}  # looked up by nbytes(), used by open()
        self.bytes_read = 0
        """Bytes of every blob served."""
        self.bytes_hashed = 0
        """Bytes hashed (less than ``bytes_read`` for blobs verified earlier)."""
        self.blobs_read = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> BlobViews:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release every blob (waiting for hashes still running) and the thread pool."""
        for blob in list(self._open):
            self._release(blob, check=False)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ reading
    def open(self, digest: str, where: str) -> StoredBlob:
        """The blob ``digest`` of the store, its digest check started (``where`` names it
        in error messages, e.g. ``"round 4, client 'client-003'"``).

        Raises
        ------
        HistoryError
            If the index lists no such blob.
        IntegrityError
            If its file is missing or too short, or its header is not a tensor encoding.
        """
        location = self._locations.get(digest) or self._store.blob_location(digest)
        try:
            fd = os.open(location.path, os.O_RDONLY)
        except FileNotFoundError:
            raise IntegrityError(
                f"{where}: blob {location} is missing: the file does not exist "
                f"(expected {digest})"
            ) from None
        mapping: mmap.mmap | None = None
        kept = False
        try:
            stat = os.fstat(fd)
            end = location.offset + location.nbytes
            if location.offset < 0 or location.nbytes < 0 or end > stat.st_size:
                present = max(0, min(location.nbytes, stat.st_size - max(location.offset, 0)))
                raise IntegrityError(
                    f"{where}: blob {location} is truncated: {present} of "
                    f"{location.nbytes} bytes present"
                )
            if location.nbytes >= MAP_THRESHOLD:
                start = location.offset - location.offset % mmap.ALLOCATIONGRANULARITY
                mapping, kept = map_blob(fd, os.fspath(location.path), start, end - start,
                                     _identity(stat))
                buffer = memoryview(mapping)[location.offset - start:]
            else:
                buffer = memoryview(os.pread(fd, location.nbytes, location.offset))
        finally:
            os.close(fd)
        try:
            codec, tensors = blob_layout(buffer)
        except IntegrityError as exc:
            if mapping is not None:
                buffer.release()
                if kept:  # not a blob: nothing of it is kept
                    drop_mapping(os.fspath(location.path), start, end - start)
                else:
                    mapping.close()
            raise IntegrityError(f"{where}: blob {location}: {exc}") from None
        blob = StoredBlob(digest=digest, where=where, location=location, buffer=buffer,
                          codec=codec, tensors=tensors, identity=_identity(stat),
                          _mapping=mapping, _kept=kept)
        self.bytes_read += location.nbytes
        self.blobs_read += 1
        key = (digest, *blob.identity, location.offset, location.nbytes)
        if self._verify == "once" and key in _verified:
            _verified.move_to_end(key)
        elif location.nbytes >= MAP_THRESHOLD:
            blob._check = self._hash_pool().submit(_sha256, buffer)
            self.bytes_hashed += location.nbytes
        else:
            self.bytes_hashed += location.nbytes
            self._verify_digest(blob, _sha256(buffer))
        self._open.append(blob)
        return blob

    def nbytes(self, digest: str) -> int:
        """The size of blob ``digest`` as the index lists it (nothing is read)."""
        location = self._locations.get(digest)
        if location is None:
            location = self._locations[digest] = self._store.blob_location(digest)
        return location.nbytes

    def check(self, blob: StoredBlob | None = None) -> None:
        """Wait for the digest check of ``blob`` (default: of every open blob); raise
        :class:`IntegrityError` naming the first that does not match, or whose file
        changed since it was opened."""
        for item in [blob] if blob is not None else list(self._open):
            if item._check is not None:
                found = item._check.result()
                item._check = None
                self._verify_digest(item, found)
            self._check_unchanged(item)

    def release(self, blob: StoredBlob) -> None:
        """Check ``blob`` (as :meth:`check`) and release its bytes."""
        self._release(blob, check=True)

    # ------------------------------------------------------------------ internals
    def _hash_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers,
                                            thread_name_prefix="fedforget-digest")
        return self._pool

    def _verify_digest(self, blob: StoredBlob, found: str) -> None:
        if found != blob.digest:
            raise IntegrityError(
                f"{blob.where}: blob {blob.location} is altered: its SHA-256 is {found}, "
                f"expected {blob.digest}"
            )
        if time.time_ns() - blob.identity[4] < SETTLED_SECONDS * 1e9:
            return  # changed too recently for its time stamps to tell a later write apart
        key = (blob.digest, *blob.identity, blob.location.offset, blob.location.nbytes)
        _verified[key] = None
        _verified.move_to_end(key)
        while len(_verified) > _VERIFIED_MAX:
            _verified.popitem(last=False)

    def _check_unchanged(self, blob: StoredBlob) -> None:
        if blob._mapping is None:
            return  # a copy: what was hashed is what is used
        try:
            now = _identity(os.stat(blob.location.path))
        except FileNotFoundError:
            now = None
        if now != blob.identity:
            raise IntegrityError(
                f"{blob.where}: the file {blob.location.path} changed while blob "
                f"{blob.digest} was read from it (packs are never modified)"
            )

    def _release(self, blob: StoredBlob, *, check: bool) -> None:
        try:
            if check:
                self.check(blob)
            elif blob._check is not None:
                with contextlib.suppress(Exception):
                    blob._check.result()
        finally:
            with contextlib.suppress(ValueError):
                self._open.remove(blob)
            buffer, mapping = blob.buffer, blob._mapping
            blob._mapping = None
            # An array still viewing the bytes keeps them alive; the mapping then goes
            # with the last view.
            with contextlib.suppress(BufferError):
                buffer.release()
            if mapping is not None and not blob._kept:
                with contextlib.suppress(BufferError):
                    mapping.close()

    def iter_open(self) -> Iterator[StoredBlob]:
        """The blobs opened and not yet released."""
        return iter(list(self._open))


def _sha256(buffer: memoryview) -> str:
    return "sha256:" + hashlib.sha256(buffer).hexdigest()

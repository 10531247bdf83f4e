"""Small file helpers shared by the library and the apps.

* :func:`write_atomic` replaces a file's content all at once (old or new, never a part);
* :func:`write_new` writes a file that must not exist yet, completely or not at all;
* :class:`StorageError` and :func:`storage_error` turn the operating system's refusals
  (a full disk, a read-only file system, a missing permission) into one
  :class:`~fedforget.errors.FedForgetError` that names the file and what to do, instead of
  a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from fedforget.errors import FedForgetError

__all__ = ["StorageError", "fsync_directory", "guard_storage", "storage_error",
           "write_atomic", "write_new"]

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EIO: "input/output error",
}


class StorageError(FedForgetError, OSError):
    """A file could not be written or read because the operating system refused.

    Also an :class:`OSError` (with ``errno`` and ``filename`` set), so code that handles
    ``OSError`` keeps working. The message names the file, the operation and the reason.
    """

    def __init__(self, message: str, *, errno_: int | None = None,
                 filename: str | None = None) -> None:
        OSError.__init__(self, errno_, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[StorageError], tuple[str]]:
        return (type(self), (self.message,))


def storage_error(exc: OSError, path: str | os.PathLike[str], action: str,
                  consequence: str = "") -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while ``action`` (e.g. ``"write"``) on
    ``path``; ``consequence`` says what state things were left in (e.g. "the store is
    unchanged")."""
    if isinstance(exc, StorageError):
        return exc
    reason = _REASONS.get(exc.errno or -1, exc.strerror or str(exc))
    message = f"cannot {action} {path}: {reason}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (free some space and run the command again)"
    elif exc.errno == errno.EROFS:
        message += " (the run directory must be on a writable file system for this command)"
    if consequence:
        message += f"; {consequence}"
    return StorageError(message, errno_=exc.errno, filename=str(path))


@contextlib.contextmanager
def guard_storage(path: str | os.PathLike[str], action: str,
                  consequence: str = "") -> Iterator[None]:
    """Re-raise an :class:`OSError` of the block as a :class:`StorageError` on ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(exc, path, action, consequence) from exc


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new file in it survives a power loss."""
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - not POSIX
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False
                 ) -> Path:
    """Replace ``path``'s content with ``data`` so that a reader (or a process killed
    mid-write) sees the old content or the new, never a part: write a temporary file in the
    same directory, then rename it over ``path``. With ``fsync`` the file and its directory
    are fsync'ed, so the new content also survives a power loss. Returns ``path``.

    Raises
    ------
    StorageError
        If the file cannot be written (full disk, read-only file system, permissions); the
        old content is then unchanged and no temporary file is left.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(raw)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_directory(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise storage_error(exc, path, "write", "its old content is unchanged") from exc
        raise
    return path


def write_new(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path``, which must not exist, completely or not at all.

    The bytes go to a temporary file in the same directory, are fsync'ed, and are linked to
    ``path`` (``os.link`` fails if ``path`` exists); the directory is fsync'ed.

    Raises
    ------
    FileExistsError
        If ``path`` exists (nothing is written).
    StorageError
        If the file cannot be written; nothing is left behind.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                fd = -1
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            if fd >= 0:
                os.close(fd)
        os.link(tmp, target)
        fsync_directory(target.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        raise storage_error(exc, target, "write", "nothing was written") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return target

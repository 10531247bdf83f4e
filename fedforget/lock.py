"""One writer at a time per run directory: an advisory lock on ``<run>/fedforget.lock``.

.. code-block:: python

    with run_lock(run_dir, command="fedforget unlearn", timeout=0):
        ...  # train, unlearn: everything that writes models, results, receipts

The lock is :func:`fcntl.flock` (``LOCK_EX``) on a lock file in the run directory. The
kernel drops it when the holder's process ends, however it ends (``kill -9`` included), so
a lock is never left stale; the file itself stays (it is never deleted: deleting a flock'ed
file lets two processes each lock "their" file). While held, the file names the holder
(command, PID, host, start time), so that a refused second writer says who holds it.

A second writer waits up to ``timeout`` seconds (0: refuse at once; None: wait forever) and
is then refused with :class:`RunLockedError`. Within one process the lock is re-entrant (a
nested ``run_lock`` of the same directory succeeds), since flock would otherwise block the
process on itself.

What takes the lock is the caller's decision; the intended wiring: ``train`` and ``unlearn``
hold it for their whole run; ``withdraw`` does not (it writes one SQLite transaction and
signs one head, both safe next to a running ``train``, and a withdrawal recorded during
training must take effect from the next round); ``history verify`` takes it *shared*
(opened read-only, never created), so that it does not read a store mid-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedforget.errors import FedForgetError
from fedforget.fileio import storage_error

__all__ = ["LOCK_FILENAME", "LockHolder", "RunLockedError", "lock_holder", "run_lock"]

LOCK_FILENAME = "fedforget.lock"
"""The lock file's name in a run directory."""

_POLL = 0.05


class RunLockedError(FedForgetError):
    """Another process holds the run directory's lock (the message names it)."""


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a run directory's lock, as it wrote itself into the lock file."""

    command: str
    pid: int
    host: str
    since: str

    def describe(self) -> str:
        """``"`fedforget train` (PID 4242 on host-a, since 2025-01-31T12:00:00Z)"``."""
        return f"`{self.command}` (PID {self.pid} on {self.host}, since {self.since})"


def lock_holder(directory: str | os.PathLike[str]) -> LockHolder | None:
    """The holder named in the lock file of ``directory`` (None if unnamed or unreadable).
    This reads the file only; whether the lock is held is what :func:`run_lock` finds."""
    try:
        data = json.loads((Path(directory) / LOCK_FILENAME).read_text(encoding="utf-8"))
        return LockHolder(str(data["command"]), int(data["pid"]), str(data["host"]),
                          str(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


_held: dict[str, int] = {}  # realpath -> nesting depth, in this process
_held_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(
    directory: str | os.PathLike[str],
    *,
    command: str,
    timeout: float | None = 0.0,
) -> Iterator[Path]:
    """Hold the exclusive lock of run directory ``directory`` (created if missing).

    Parameters
    ----------
    directory
        The run directory.
    command
        What holds it, for the message another writer gets (``"fedforget train"``).
    timeout
        Seconds to wait for a holder to finish: 0 refuses at once, None waits forever.

    Yields
    ------
    Path
        The lock file.

    Raises
    ------
    RunLockedError
        If another process holds the lock after ``timeout`` seconds; the message names the
        holder's command and PID.
    StorageError
        If the lock file cannot be created (read-only file system, full disk, no
        permission): a command that writes cannot run there.
    """
    folder = Path(directory)
    path = folder / LOCK_FILENAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(folder)
    except OSError as exc:
        raise storage_error(exc, folder, "create the run directory") from exc
    with _held_guard:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(exc, path, "create the lock file",
                            "no command that writes can run in this directory") from exc
    try:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    holder = lock_holder(folder)
                    who = holder.describe() if holder else "another process (unnamed)"
                    waited = "" if not timeout else f" after waiting {timeout:g} s"
                    raise RunLockedError(
                        f"run directory {folder} is locked by {who}{waited}; one command "
                        f"writes to a run at a time: wait for it to finish, or stop it "
                        f"(`{command}` was refused, nothing was written)"
                    ) from None
                time.sleep(_POLL)
        record = json.dumps({
            "command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }).encode()
        with contextlib.suppress(OSError):  # the name is a courtesy; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, record + b"\n", 0)
        with _held_guard:
            _held[key] = 0
        try:
            yield path
        finally:
            with _held_guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock

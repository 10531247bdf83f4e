"""Local Flower processes: free ports, the environment, and stopping by PID.

Flower starts some of its processes detached (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp`` in new sessions), so a process group does not reach them: the
descendants of a process are listed from ``/proc`` by parent PID *before* it stops, and
those still alive afterwards are ended by their PIDs. Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["alive", "descendants", "flower_bin", "flower_env", "free_port", "stop_tree",
           "wait_until"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (else the bare name)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


ADDRESS_IN_USE = "address already in use"
"""What a Flower process logs when another process holds the port it was given."""

BIND_ATTEMPTS = 3
"""Starts of a process whose freshly chosen port another process took first (between
:func:`free_port` and the process's bind)."""


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a quiet, local, offline Flower process with ``FLWR_HOME``.

    The SuperLink and SuperNode start ``flower-superexec`` and friends by name: this
    interpreter's environment comes first on ``PATH``.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("FLWR_LOG_LEVEL", "WARNING")
    env.update(extra)
    return env


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (read from /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen[bytes], *, grace: float = 10.0,
              family: list[int] | None = None) -> None:
    """Stop ``proc`` and every process it started, by PID: SIGTERM, then SIGKILL.

    ``family``: descendants listed earlier (e.g. while ``proc`` still ran); they are
    stopped as well as the ones listed now.
    """
    known = set(family or []) | set(descendants(proc.pid))
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in sorted(known):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        while time.monotonic() < deadline and any(alive(p) for p in known):
            time.sleep(0.05)
        deadline = time.monotonic() + grace / 2


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.05,
               what: str, error: type[Exception]) -> None:
    """Poll ``condition`` until it holds; raise ``error`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise error(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)

"""fedforget.lock: one writer per run directory, a second refused (naming the holder) or
waiting; the lock dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from fedforget.errors import FedForgetError
from fedforget.history import HistoryStore
from fedforget.lock import LOCK_FILENAME, RunLockedError, lock_holder, run_lock

HOLD = """
import sys, time
from fedforget.lock import run_lock
with run_lock(sys.argv[1], command="fedforget unlearn", timeout=0):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(directory: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(seconds)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc = hold(tmp_path / "run", 30)
    try:
        with (pytest.raises(RunLockedError) as info,
              run_lock(tmp_path / "run", command="fedforget train", timeout=0)):
            pass
        message = str(info.value)
        assert f"is locked by `fedforget unlearn` (PID {proc.pid} on " in message
        assert "`fedforget train` was refused, nothing was written" in message
        holder = lock_holder(tmp_path / "run")
        assert holder is not None and holder.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    proc = hold(tmp_path / "run", 0.5)
    start = time.monotonic()
    with run_lock(tmp_path / "run", command="fedforget train", timeout=30):
        waited = time.monotonic() - start
    proc.wait()
    assert waited > 0.2


def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    proc = hold(tmp_path / "run", 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with run_lock(tmp_path / "run", command="fedforget train", timeout=5):
        pass  # no stale lock


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with run_lock(tmp_path / "run", command="outer"), run_lock(tmp_path / "run",
                                                                command="inner"):
        assert lock_holder(tmp_path / "run").command == "outer"  # type: ignore[union-attr]


def test_a_lock_file_does_not_stop_a_store_from_being_created(tmp_path: Path) -> None:
    with run_lock(tmp_path / "run", command="fedforget train"):
        HistoryStore.create(tmp_path / "run", run_config={}).close()
    assert (tmp_path / "run" / LOCK_FILENAME).exists()


def test_a_lock_on_a_read_only_place_is_a_clear_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def read_only(path: object, flags: int, *args: object) -> int:
        if str(path).endswith(LOCK_FILENAME) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    (tmp_path / "run").mkdir()
    monkeypatch.setattr("fedforget.lock.os.open", read_only)
    with (pytest.raises(FedForgetError, match=r"cannot create the lock file .*fedforget.lock: "
                        r"read-only file system"),
          run_lock(tmp_path / "run", command="fedforget train")):
        pass

"""A training process killed mid-run leaves a verifiable store that resumes exactly."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMALL, train_small

from fedforget.history import HistoryStore, verify_store
from fedforget.history.wal import analyse_wal

ROUNDS = 60


def _last_round(index: Path) -> int:
    if not index.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0])
    except sqlite3.Error:  # the schema may not exist yet
        return 0


def _state(out: Path) -> dict[str, object]:
    """What a failed assertion should show of a run directory: its files (size, inode,
    modification time), the last round a fresh read-only SQLite connection sees, the last
    round of fedforget's own image of the index and its log, and the log's analysis."""
    files = {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_ino, p.stat().st_mtime_ns)
             for p in sorted(out.iterdir()) if p.is_file()}
    try:  # fedforget's own reading of the index and its log (what `read_only` opens)
        with HistoryStore.open(out, read_only=True) as image:
            image_round: object = image.last_round
    except Exception as exc:  # noqa: BLE001 - shown, not handled
        image_round = repr(exc)
    return {"files": files, "last round": _last_round(out / "history.sqlite"),
            "last round of the image": image_round,
            "log": _log(out / "history.sqlite-wal"), "pid": os.getpid()}


def _log(path: Path) -> dict[str, object]:
    report = analyse_wal(path)
    return {"frames": len(report.frames), "damage": report.damage,
            "torn commit": report.torn_commit, "tail frames": report.tail_frames,
            "beyond": len(report.beyond)}


def _write_config(path: Path) -> None:
    values = {**SMALL, "num-rounds": ROUNDS}
    lines = [f"{k} = {v!r}\n" if not isinstance(v, str) else f'{k} = "{v}"\n'
             for k, v in values.items()]
    path.write_text("".join(lines))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_model(tmp_path: Path) -> None:
    # Prepare
    config = tmp_path / "run.toml"
    _write_config(config)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fedforget.cli", "train", str(config), "--out", str(out),
               "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    # Execute: kill it for real once a few rounds are committed.
    deadline = time.monotonic() + 120
    while _last_round(out / "history.sqlite") < 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "training did not reach round 3 in 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Assert: the store is intact at a complete round short of the end. The kill may fall
    # between a round's commit and its signed head: such rounds are reported as not yet
    # covered by a signed head (the resume signs them), and nothing else is.
    report = verify_store(out)
    assert all("not covered by any signed tree head" in p for p in report.problems), (
        report.problems)
    with HistoryStore.open(out) as store:
        killed_at = store.last_round
    assert 3 <= killed_at < ROUNDS
    # Resume with the same command; compare with an uninterrupted run.
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after_resume = _state(out)
    assert verify_store(out).ok
    uninterrupted = train_small(tmp_path / "whole", **{"num-rounds": ROUNDS})
    with HistoryStore.open(out) as store:
        summary = store.summary()
    # (seen twice, once in CI on a loaded machine and once here on 2026-12-04 after other
    # test files in the same process: the resume exited 0 and printed "rounds: 60", yet the
    # store opened here ended at the killed round; not reproduced in 6 runs of this test
    # alone. What the directory held after the resume and now is kept to tell why.)
    assert summary["rounds"] == ROUNDS, (killed_at, resumed.stdout[-3000:],
                                         resumed.stderr[-3000:], after_resume, _state(out))
    assert summary["final_model_digest"] == uninterrupted["final_model_digest"]

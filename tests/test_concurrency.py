"""One writer at a time, and nothing signed for work that did not commit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, train_small

from fedforget.engine import run_unlearning
from fedforget.history import verify_store
from fedforget.lock import lock_holder, run_lock
from fedforget.rundir import RunDirectory
from fedforget.withdrawal import WithdrawalLedger


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "fedforget.lock"}


def _unlearn_command(run: Path, client: str, method: str) -> list[str]:
    return [sys.executable, "-m", "fedforget.cli", "unlearn", str(run), "--client", client,
            "--method", method, "--quiet"]


def test_an_unlearn_while_another_command_holds_the_run_is_refused_and_writes_nothing(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_small(run)
    before = _snapshot(run)
    with run_lock(run, command="fedforget train (the test)"):
        done = subprocess.run(_unlearn_command(run, "client-001", "retrain"), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "is locked by" in done.stderr and "fedforget train (the test)" in done.stderr
    assert str(os.getpid()) in done.stderr  # the holder, by PID
    assert _snapshot(run) == before


@pytest.mark.slow
def test_two_concurrent_unlearns_one_refused_and_the_run_stays_consistent(
        tmp_path: Path) -> None:
    # Prepare: a run long enough for a retrain to take a while
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 30})
    first = subprocess.Popen(_unlearn_command(run, "client-001", "retrain"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (holder := lock_holder(run)) is None or holder.pid != first.pid:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first command never took the lock"
        time.sleep(0.05)
    # Execute: a second command while the first one holds the run
    second = subprocess.run(_unlearn_command(run, "client-002", "rollback"), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    # Assert: one refused, one done; every receipt is a committed result's; the ledger and
    # the model in service agree (history verify checks all of it)
    assert second.returncode == 2 and "is locked by" in second.stderr
    assert first.returncode == 0, err
    with WithdrawalLedger(run) as ledger:
        assert ledger.for_client("client-001").state == "done"  # type: ignore[union-attr]
        assert ledger.for_client("client-002") is None
    report = verify_store(run)
    assert report.ok, report.problems
    assert report.receipts_checked == 1


def test_no_receipt_is_left_for_a_result_that_did_not_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a commit that fails (as a full disk would at the rename)
    import fedforget.service

    run = RunDirectory(tmp_path / "run")
    train_small(run.path)

    def failing(partial: Path, final: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fedforget.service, "_commit", failing)
    # Execute
    with pytest.raises(OSError, match="No space left"):
        run_unlearning(run.path, client="client-001", method="retrain", progress=False)
    # Assert: no result, no receipt, no chain head, no salt; the request failed, saying why
    assert not list(run.receipts.glob("*.json")) and not run.latest_receipt.exists()
    assert not [p for p in run.unlearned.glob("wr-*/*")]
    assert not [p for o in run.outboxes() for p in o.iterdir()]
    with WithdrawalLedger(run.path) as ledger:
        request = ledger.for_client("client-001")
    assert request is not None and request.state == "failed"
    assert "No space left" in request.detail["error"]  # type: ignore[index]
    report = verify_store(run.path)
    assert report.ok, report.problems


def test_staging_left_by_a_killed_command_is_cleaned_by_the_next(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    train_small(run.path)
    left = run.unlearned / "wr-000000000000" / ".retrain.partial-deadbeef"
    left.mkdir(parents=True)
    (left / "model.fft").write_bytes(b"half a model")
    run_unlearning(run.path, client="client-001", method="subtract", progress=False)
    assert not left.exists()

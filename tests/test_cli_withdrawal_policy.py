"""`fedforget train --withdrawal-method`: the server's policy for client-asked withdrawals."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SMALL

from fedforget.cli import main
from fedforget.rundir import RunDirectory
from fedforget.withdrawal import WithdrawalLedger


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in SMALL.items()))
    return path


def test_the_next_training_command_serves_a_client_asked_withdrawal_by_its_policy(
        tmp_path: Path) -> None:
    config, run = _config(tmp_path), RunDirectory(tmp_path / "run")
    assert main(["train", str(config), "--out", str(run.path), "--quiet"]) == 0
    assert main(["client", "withdraw", "--state-dir", str(run.client_state("client-003")),
                 "--reason", "moving"]) == 0
    assert main(["train", str(config), "--out", str(run.path), "--quiet",
                 "--withdrawal-method", "rollback"]) == 0
    with WithdrawalLedger(run.path) as ledger:
        request = ledger.for_client("client-003")
    assert request is not None and request.state == "done" and request.method == "rollback"
    assert run.result_dir(request.request_id, "rollback").is_dir()


@pytest.mark.parametrize(("flags", "message"), [
    (["--withdrawal-method", "nope"], "unknown unlearning method 'nope'"),
    (["--withdrawal-method", "rollback", "--withdrawal-params", "{bad"], "not a JSON object"),
    (["--withdrawal-params", "{}"], "without --withdrawal-method"),
])
def test_a_bad_policy_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        message: str) -> None:
    out = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--out", str(out), "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

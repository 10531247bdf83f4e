"""The fedforget command: history verify/show, config errors, and the demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from fedforget.cli import main
from fedforget.history import HistoryStore
from fedforget.history.store import BlobLocation, blob_location


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared run, safe to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _update_blob(run: Path, t: int, client: str) -> BlobLocation:
    with HistoryStore.open(run) as store:
        digest = store.round(t).participant(client).update_digest
    return blob_location(run, digest)


def test_verify_accepts_an_intact_run(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "verify", str(trained_run)]) == 0
    assert "OK: 3 rounds" in capsys.readouterr().out


@pytest.mark.parametrize("position", [0, 17, -1])
def test_verify_names_the_round_client_and_file_of_a_flipped_byte(
    run_copy: Path, position: int, capsys: pytest.CaptureFixture[str]
) -> None:
    blob = _update_blob(run_copy, 2, "client-001")
    data = bytearray(blob.path.read_bytes())
    data[blob.offset + position % blob.nbytes] ^= 0x01  # a byte of the blob, in its pack
    blob.path.write_bytes(bytes(data))
    assert main(["history", "verify", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "round 2" in err and "client-001" in err and blob.path.name in err
    assert "altered" in err


def test_verify_names_a_deleted_blob(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = _update_blob(run_copy, 3, "client-002")
    blob.path.unlink()
    assert main(["history", "verify", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "round 3" in err and "client-002" in err and blob.path.name in err
    assert "missing" in err


def test_verify_names_a_truncated_global_model(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with HistoryStore.open(run_copy) as store:
        blob = store.blob_location(store.model_digest(2))
    blob.path.write_bytes(blob.path.read_bytes()[: blob.offset + blob.nbytes - 5])
    assert main(["history", "verify", str(run_copy)]) == 1
    err = capsys.readouterr().err
    assert "round 2" in err and blob.path.name in err and "truncated" in err


def test_show_json_has_the_final_digest_rounds_and_clients(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "show", str(trained_run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rounds"] == 3
    assert sorted(shown["clients"]) == [f"client-{i:03d}" for i in range(4)]
    assert shown["clients"]["client-000"] == [1, 2, 3]
    assert shown["final_model_digest"].startswith("sha256:")
    assert shown["codec"] == "fp32" and shown["retain_interval"] == 1


def test_show_text_lists_participation_as_ranges(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "show", str(trained_run)]) == 0
    assert "client-003: 1-3" in capsys.readouterr().out


def test_a_bad_config_value_is_an_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('dataset = "cifar"\n')
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "dataset = 'cifar' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verify_of_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "verify", str(tmp_path)]) != 0
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_as_the_readme_runs_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    fedforget = Path(sys.executable).parent / "fedforget"
    done = subprocess.run([str(fedforget), "demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final model digest:  sha256:" in done.stdout
    accuracy = float(done.stdout.split("final test accuracy:")[1].split()[0])
    assert accuracy > 0.85  # digits, 10 clients: a useful model
    # The backdoor client withdrew; four methods unlearned it; every receipt verified.
    for method in ("retrain", "rollback", "federaser", "subtract"):
        assert f"\n{method} " in done.stdout
    assert done.stdout.count("$ fedforget receipt verify ") == 4
    assert done.stdout.count("\nOK receipt ") == 4
    verify = subprocess.run([str(fedforget), "history", "verify", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr

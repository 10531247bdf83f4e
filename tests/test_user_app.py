"""fedforget added to a separate Flower app (tests/user_app: its own package, model, data and
FedAvg, written as Flower's PyTorch template writes one) with a handful of lines.

The lines fedforget adds carry a marker: ``# + fedforget`` (added) or
``# ~ fedforget: <the line before>`` (changed). The test counts them, rebuilds the app as it
was without them, and runs the app with them as a user would: installed fedforget, no
PYTHONPATH, commands in a directory of the user's — training in-process and under
``flwr run``, then a withdrawal unlearned by ``rollback`` (bit-identical to ``retrain``),
``federaser`` and ``subtract`` (the last one with no app at all), each receipt verified
with ``fedforget receipt verify`` from the client's own saved head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedforget.history import HistoryStore, verify_store
from fedforget.rundir import RunDirectory
from fedforget.tensors import decode, tensors_digest

USER_APP = Path(__file__).resolve().parent / "user_app"
ADDED, CHANGED = "# + fedforget", "# ~ fedforget:"
FEDFORGET = Path(sys.executable).parent / "fedforget"


def _app_files() -> list[Path]:
    return sorted(p for p in USER_APP.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _marked_lines() -> list[tuple[str, str]]:
    return [(str(p.relative_to(USER_APP)), line) for p in _app_files()
            for line in p.read_text().splitlines() if ADDED in line or CHANGED in line]


def _without_fedforget(text: str) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        if ADDED in line:
            continue
        if CHANGED in line:
            indent = line[: len(line) - len(line.lstrip())]
            line = indent + line.split(CHANGED, 1)[1].strip() + "\n"
        out.append(line)
    return "".join(out)


def _copy_app(target: Path, *, plain: bool) -> Path:
    for path in _app_files():
        dst = target / path.relative_to(USER_APP)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(_without_fedforget(path.read_text()) if plain else path.read_text())
    return target


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDFORGET_APP_DIR")}
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def _fedforget(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(FEDFORGET), *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"fedforget {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _file_digest(path: Path) -> str:
    return tensors_digest(decode(path.read_bytes()))


def test_fedforget_adds_at_most_ten_lines_to_the_app() -> None:
    # Prepare / Execute
    marked = _marked_lines()
    # Assert: the count the README quotes, and nothing of fedforget in the app without them
    assert 0 < len(marked) <= 10, marked
    for path in _app_files():
        assert "fedforget" not in _without_fedforget(path.read_text()), path
    files = {name for name, _ in marked}
    assert files == {"pyproject.toml", "userapp/server_app.py", "userapp/client_app.py"}


def test_the_app_without_fedforget_is_a_working_flower_app(tmp_path: Path) -> None:
    # The app as its author wrote it runs (here on fedforget's in-process Grid, which runs
    # any Flower app) and knows nothing of fedforget: no history is written.
    app = _copy_app(tmp_path / "plain", plain=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from fedforget.engine.inprocess import run_inprocess\n"
        "from userapp.server_app import app as server\n"
        "from userapp.client_app import app as client\n"
        "cfg = {'num-server-rounds': 2, 'fraction-evaluate': 0.5, 'local-epochs': 1,\n"
        "       'learning-rate': 0.1, 'batch-size': 32}\n"
        "run_inprocess(server, client, num_nodes=3, run_config=cfg)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(app)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "final_model.pt").exists()
    assert not list(tmp_path.rglob("history.sqlite"))


@pytest.mark.slow
def test_withdraw_and_unlearn_a_client_of_the_users_app_through_the_cli(
        tmp_path: Path) -> None:
    # Prepare: the user's project and a working directory of theirs (no fedforget inside)
    app = _copy_app(tmp_path / "userapp-project", plain=False)
    work = tmp_path / "work"
    work.mkdir()
    run = work / "runs" / "mine"
    # Execute: train in-process, 4 clients
    trained = _fedforget("train", "--app", str(app), "--out", str(run), "--clients", "4",
                         "--quiet", cwd=work)
    assert "rounds:              4" in trained.stdout
    with HistoryStore.open(run) as store:
        assert store.roster() == ("client-000", "client-001", "client-002", "client-003")
        assert store.last_round == 4
        assert store.run_config["num-server-rounds"] == 4  # the app's keys, as the app's
    head = RunDirectory(run).client_state("client-001") / "head.json"
    assert json.loads(head.read_text())["size"] >= 3  # the client kept the heads it saw
    _fedforget("withdraw", str(run), "--client", "client-001", "--reason", "moving", cwd=work)
    results = {}
    for method, extra in (("rollback", ["--app", str(app)]), ("federaser", ["--app", str(app)]),
                          ("subtract", [])):
        done = _fedforget("unlearn", str(run), "--client", "client-001", "--method", method,
                          "--json", *extra, cwd=work)
        results[method] = json.loads(done.stdout)
    # Assert: rollback's model file is the retrained reference's, bit for bit
    reference = RunDirectory(run).reference_dir(["client-001"]) / "model.fft"
    rolled = _file_digest(Path(results["rollback"]["model_path"]))
    assert rolled == _file_digest(reference)
    assert results["rollback"]["reference"]["bit_identical"] is True
    assert results["federaser"]["cost"]["client_epochs"] > 0
    assert _file_digest(Path(results["federaser"]["model_path"])) != rolled
    # The app's own evaluation measured the models; subtract ran with no app at all
    assert set(results["rollback"]["metrics"]["test_accuracy"]) == {
        "original", "unlearned", "retrained"}
    assert results["rollback"]["engine"] == "inprocess"
    assert results["subtract"]["engine"] == "server"
    assert results["subtract"]["cost"]["client_epochs"] == 0
    # rollback's and federaser's receipts were delivered to the client at once; subtract ran
    # without the app, so its salt waits in the server's outbox until the client's next
    # contact: the next run of the app (here a resume with nothing left to train)
    state = RunDirectory(run).client_state("client-001")
    waiting = run / results["subtract"]["receipt"]["salt_outbox"]
    assert waiting.exists()
    _fedforget("train", "--app", str(app), "--out", str(run), "--clients", "4", "--quiet",
               cwd=work)
    assert not waiting.exists()
    # Every receipt verifies offline from the client's own copies, the consistency proof
    # starting at the head the client saved
    for method, result in results.items():
        receipt_id = result["receipt"]["receipt_id"]
        salt = (state / "receipts" / f"{receipt_id}.salt").read_text().strip()
        verified = _fedforget(
            "receipt", "verify", str(state / "receipts" / f"{receipt_id}.json"),
            "--key", str(state / "server.pub"),
            "--model", result["model_path"], "--head", str(head), "--salt", salt,
            "--client", "client-001", cwd=work)
        assert verified.stdout.startswith("OK receipt"), method
        assert "consistency proof from size" in verified.stdout, method
    assert verify_store(run).ok


@pytest.mark.flower
@pytest.mark.slow
def test_the_users_app_trains_under_flwr_run(tmp_path: Path) -> None:
    app = _copy_app(tmp_path / "userapp-project", plain=False)
    work = tmp_path / "work"
    work.mkdir()
    sim, inproc = work / "sim", work / "inproc"
    _fedforget("train", "--app", str(app), "--out", str(sim), "--clients", "4", "--engine",
               "simulation", "--quiet", cwd=work, timeout=900)
    _fedforget("train", "--app", str(app), "--out", str(inproc), "--clients", "4", "--quiet",
               cwd=work)
    with HistoryStore.open(sim) as a, HistoryStore.open(inproc) as b:
        assert a.last_round == b.last_round == 4
        assert a.roster() == b.roster()
        assert a.clients() == b.clients()  # the same clients sampled by stable id
    assert verify_store(sim).ok


def test_the_readme_shows_exactly_the_lines_fedforget_adds() -> None:
    readme = (USER_APP.parents[1] / "README.md").read_text()
    section = readme[readme.index("## Add unlearning to your Flower app"):
                     readme.index("## Research comparisons")]
    shown = {line.strip() for line in section.splitlines()}
    marked = _marked_lines()
    for _, line in marked:
        code = line.split("#")[0].strip() if ADDED in line else line.split(CHANGED)[0].strip()
        assert code in shown, code
    assert f"**{len(marked)} lines**" in section

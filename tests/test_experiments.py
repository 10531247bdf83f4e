"""The experiment runner: spec checks, grid expansion, results, report, resuming after a kill."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedforget.errors import ConfigError
from fedforget.experiments import load_experiment, parse_experiment, run_experiment
from fedforget.experiments.report import mean_std
from fedforget.tensors import decode

ROOT = Path(__file__).resolve().parents[1]

BASE_RUN = """
[run]
dataset = "synthetic"
synthetic-samples = 400
num-clients = 4
num-rounds = {rounds}
partitioner = "iid"
model = "mlp"
hidden-size = 8
local-epochs = 1
batch-size = 16
learning-rate = 0.1
history-fsync = false
"""


def experiment_text(*, rounds: int = 3, seeds: str = "[0, 1]", grid: str = "",
                    methods: str = "[methods.retrain]\n[methods.rollback]\n[methods.fedaccum]\n"
                                   'method = "subtract"\n', extra: str = "") -> str:
    return (
        "[experiment]\n"
        'name = "tiny"\n'
        f"seeds = {seeds}\n"
        'forget = ["client-001"]\n'
        f"{extra}\n"
        + BASE_RUN.format(rounds=rounds)
        + (f"\n[grid]\n{grid}\n" if grid else "")
        + "\n" + methods
    )


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- the spec
def test_grid_expands_to_points_times_seeds_times_methods(tmp_path: Path) -> None:
    spec = load_experiment(write(tmp_path, experiment_text(
        grid="partitioner = [\"iid\", \"dirichlet\"]\nlocal-epochs = [1, 2]")))

    cells = spec.cells()

    assert len(spec.points()) == 2 * 2 * 2  # partitioner x local-epochs x seeds
    assert len(cells) == 8 * 3
    assert len({c.cell_id for c in cells}) == len(cells)
    assert cells[0].cell_id == "partitioneriid-epochs1-seed0-retrain"
    assert {p.config.local_epochs for p in spec.points()} == {1, 2}
    assert [m.label for m in spec.methods] == ["retrain", "rollback", "fedaccum"]
    assert spec.methods[2].method == "subtract"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (experiment_text() + "\n[extra]\n", "unknown table or key 'extra'"),
        (experiment_text(extra="colour = 1"), "unknown key 'colour' in [experiment]"),
        (experiment_text().replace('["client-001"]', '["client-009"]'),
         "forget names 'client-009', which is not a client of a run with num-clients = 4"),
        (experiment_text(grid="dirichlet-alpha = [0.5, -1.0]"),
         "dirichlet-alpha = -1.0 is out of range"),
        (experiment_text(grid="seed = [1, 2]"), "[grid] seed cannot be varied here"),
        (experiment_text(methods="[methods.federaser]\ncalibration-ratio = 1.5\n"),
         "[methods.federaser]: calibration-ratio = 1.5 is out of range"),
        (experiment_text(methods="[methods.magic]\n"), "unknown unlearning method 'magic'"),
        (experiment_text(methods=""), "the table [methods] is missing"),
        (experiment_text(seeds="[1, 1]"), "seeds = [1, 1] repeats a seed"),
        (experiment_text(extra='metrics = ["no-such-metric"]'),
         "unknown metric 'no-such-metric'"),
        (experiment_text().replace("[run]", "[run]\nseed = 3"),
         "[run] seed is set by the runner per cell"),
    ],
)
def test_bad_experiment_files_are_refused_naming_the_key(
        tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(write(tmp_path, text))
    assert message in str(info.value)


def test_a_missing_experiment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")


def test_shipped_experiment_files_parse() -> None:
    files = sorted((ROOT / "simulations").glob("*.toml"))
    experiments = [f for f in files if "[experiment]" in f.read_text()]
    assert {f.stem for f in experiments} >= {"quickstart", "federaser_fashion_mnist",
                                              "backdoor", "noniid_sweep"}
    for path in experiments:
        spec = load_experiment(path)
        assert spec.cells()
    sweep = load_experiment(ROOT / "simulations" / "noniid_sweep.toml")
    assert sweep.grid["dirichlet-alpha"] == (0.1, 0.5, 10.0)


def test_mean_std_is_the_sample_standard_deviation() -> None:
    mean, std, n = mean_std([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations 16/9, 1/9, 25/9 -> sum 42/9; / (n - 1) = 21/9
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert std == pytest.approx((21 / 9) ** 0.5)
    assert mean_std([5.0]) == (5.0, 0.0, 1)


# ------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    tmp = tmp_path_factory.mktemp("exp")
    spec = load_experiment(write(tmp, experiment_text()))
    out = tmp / "out"
    run_experiment(spec, out, progress=False)
    return out, spec


def test_a_run_writes_one_row_per_cell_and_a_report_with_plots(finished: tuple[Path, Any]
                                                                ) -> None:
    out, spec = finished

    rows = read_csv(out / "results.csv")

    assert [r["cell_id"] for r in rows] == [c.cell_id for c in spec.cells()]
    assert all(r["status"] == "done" for r in rows)
    report = (out / "report.md").read_text()
    assert "| rollback |" in report and "| fedaccum |" in report and "| retrained |" in report
    for name in ("accuracy_vs_cost.png", "accuracy_per_round.png", "client_impact.png"):
        path = out / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in report


def test_rollback_rows_equal_retrain_rows_and_the_model_files_agree(
        finished: tuple[Path, Any]) -> None:
    out, _ = finished
    rows = {r["cell_id"]: r for r in read_csv(out / "results.csv")}
    for seed in (0, 1):
        retrain, rollback = rows[f"seed{seed}-retrain"], rows[f"seed{seed}-rollback"]
        assert rollback["model_digest"] == retrain["model_digest"]
        assert rollback["bit_identical_to_retrained"] == "True"
        assert rollback["test_accuracy_unlearned"] == retrain["test_accuracy_unlearned"]
    # Different seeds train different models.
    assert rows["seed0-retrain"]["model_digest"] != rows["seed1-retrain"]["model_digest"]


def test_the_report_means_are_the_means_of_the_csv(finished: tuple[Path, Any]) -> None:
    out, _ = finished
    rows = [r for r in read_csv(out / "results.csv") if r["label"] == "fedaccum"]
    values = [float(r["test_accuracy_unlearned"]) for r in rows]
    mean = sum(values) / 2
    std = abs(values[0] - values[1]) / 2**0.5  # sample std of two values
    expected = f"{100 * mean:.2f}" if std == 0 else f"{100 * mean:.2f} ± {100 * std:.2f}"
    line = next(x for x in (out / "report.md").read_text().splitlines()
                if x.startswith("| fedaccum |"))
    assert line.split(" | ")[1] == expected


def test_running_again_skips_every_finished_cell(finished: tuple[Path, Any]) -> None:
    out, spec = finished
    cells = sorted((out / "cells").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in cells}
    log = _Stream()

    run_experiment(spec, out, progress=True, stream=log)  # type: ignore[arg-type]

    assert f"{len(cells)} already finished, 0 to run" in log.text
    assert "[train" not in log.text and "[cell" not in log.text
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before


def test_a_changed_method_parameter_reruns_only_that_method(tmp_path: Path,
                                                            finished: tuple[Path, Any]) -> None:
    out, spec = finished
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    changed = load_experiment(write(tmp_path, experiment_text(
        methods="[methods.retrain]\n[methods.rollback]\n[methods.fedaccum]\n"
                'method = "subtract"\nrepair-rounds = 1\n')))
    log = _Stream()

    run_experiment(changed, copy, progress=True, stream=log, report=False)  # type: ignore[arg-type]

    assert "4 already finished, 2 to run" in log.text
    assert "[train" not in log.text  # the trained runs are reused


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


# ----------------------------------------------------------------------- extending
def test_a_registered_metric_from_a_plugin_lands_in_the_results(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin_metrics_for_test.py"
    plugin.write_text(textwrap.dedent("""
        import numpy as np
        from fedforget.experiments.metrics import register_metric

        @register_metric("mean-abs-weight")
        def mean_abs_weight(ctx):
            values = np.concatenate([np.abs(v).ravel() for v in ctx.unlearned.values()])
            return float(values.mean())
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        spec = parse_experiment(__import__("tomllib").loads(experiment_text(
            seeds="[0]", methods="[methods.fedaccum]\nmethod = \"subtract\"\n",
            extra='imports = ["plugin_metrics_for_test"]\nmetrics = ["mean-abs-weight"]')))
        out = tmp_path / "out"
        run_experiment(spec, out, progress=False, report=False)
    finally:
        sys.path.remove(str(tmp_path))

    (row,) = read_csv(out / "results.csv")
    run_dir = next((out / "runs").iterdir())
    model = decode(next(run_dir.glob("unlearned/wr-*/subtract/model.fft")).read_bytes())
    expected = np.concatenate([np.abs(v).ravel() for v in model.values()]).mean()
    assert float(row["mean_abs_weight"]) == pytest.approx(float(expected), rel=1e-12)


# ------------------------------------------------------------------ kill and resume
DETERMINISTIC_SKIP = ("seconds", "speedup_wall")


def _deterministic(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not any(s in k for s in DETERMINISTIC_SKIP)}
            for r in rows]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_results(tmp_path: Path) -> None:
    config = write(tmp_path, experiment_text(
        rounds=8, methods="[methods.retrain]\n[methods.rollback]\n[methods.federaser]\n"
                          "[methods.fedaccum]\nmethod = \"subtract\"\n"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "fedforget.cli", "run", str(config), "--app", str(ROOT)]

    # An uninterrupted run.
    subprocess.run([*command, "--out", str(tmp_path / "whole"), "--quiet"], check=True,
                   env=env, capture_output=True, timeout=600)
    # A run killed (SIGKILL) once its first cell is written, then run again.
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*command, "--out", str(cut), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((cut / "cells").glob("*.json")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_with = len(list((cut / "cells").glob("*.json")))
    assert killed_with < 8  # it really was cut short
    resumed = subprocess.run([*command, "--out", str(cut)], check=True, env=env,
                             capture_output=True, text=True, timeout=600)

    assert f"{killed_with} already finished, {8 - killed_with} to run" in resumed.stderr
    assert _deterministic(read_csv(cut / "results.csv")) == _deterministic(
        read_csv(tmp_path / "whole" / "results.csv"))

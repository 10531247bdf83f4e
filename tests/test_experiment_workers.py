"""fedforget run --workers N: training runs in parallel processes, results as a serial run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_experiments import experiment_text, write

from fedforget.cli import main


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {row["cell_id"]: row for row in csv.DictReader(fh)}


def test_two_workers_give_the_serial_run_s_model_digests(tmp_path: Path) -> None:
    # Prepare: 2 seeds x 2 methods (2 training runs, independent of each other)
    spec = write(tmp_path, experiment_text(
        seeds="[0, 1]", methods='[methods.rollback]\n[methods.fedaccum]\nmethod = "subtract"\n',
        extra='shadow-attack = false\nimpact-clients = 2'))
    # Execute
    assert main(["run", str(spec), "--out", str(tmp_path / "serial"), "--quiet"]) == 0
    assert main(["run", str(spec), "--out", str(tmp_path / "parallel"), "--quiet",
                 "--workers", "2"]) == 0
    # Assert: the same cells, each with the same unlearned model digest and figures; every
    # cell file written (a parallel run resumes like a serial one)
    serial = _rows(tmp_path / "serial" / "results.csv")
    parallel = _rows(tmp_path / "parallel" / "results.csv")
    assert sorted(serial) == sorted(parallel) == [
        "seed0-fedaccum", "seed0-rollback", "seed1-fedaccum", "seed1-rollback"]
    for cell, row in serial.items():
        assert row["model_digest"].startswith("sha256:")
        assert parallel[cell]["model_digest"] == row["model_digest"]
        assert parallel[cell]["test_accuracy_unlearned"] == row["test_accuracy_unlearned"]
    assert len({r["model_digest"] for r in serial.values()}) == 4
    assert sorted(p.name for p in (tmp_path / "parallel" / "cells").glob("*.json")) == [
        f"{c}.json" for c in sorted(serial)]
    # A second parallel run finds every cell finished and changes nothing.
    cells = {p.name: p.read_bytes() for p in (tmp_path / "parallel" / "cells").glob("*")}
    assert main(["run", str(spec), "--out", str(tmp_path / "parallel"), "--quiet",
                 "--workers", "2"]) == 0
    assert _rows(tmp_path / "parallel" / "results.csv") == parallel
    assert {p.name: p.read_bytes()
            for p in (tmp_path / "parallel" / "cells").glob("*")} == cells


@pytest.mark.slow
def test_the_cells_run_as_tasks_of_a_ray_cluster(tmp_path: Path) -> None:
    # Prepare: a Ray head of this machine (started and stopped here), 2 training runs
    from fedforget.engine.simulation import local_ray

    spec = write(tmp_path, experiment_text(
        seeds="[0, 1]", methods='[methods.fedaccum]\nmethod = "subtract"\n',
        extra='shadow-attack = false\nimpact-clients = 2'))
    assert main(["run", str(spec), "--out", str(tmp_path / "serial"), "--quiet"]) == 0
    # Execute
    with local_ray(num_cpus=2) as address:
        assert main(["run", str(spec), "--out", str(tmp_path / "ray-run"), "--quiet",
                     "--ray", address]) == 0
    # Assert: the serial run's models
    serial = _rows(tmp_path / "serial" / "results.csv")
    on_ray = _rows(tmp_path / "ray-run" / "results.csv")
    assert sorted(on_ray) == sorted(serial) == ["seed0-fedaccum", "seed1-fedaccum"]
    for cell, row in serial.items():
        assert on_ray[cell]["model_digest"] == row["model_digest"]

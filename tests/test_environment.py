"""Results carry the environment that computed them; a cached reference retrained under
other kernels is said to be so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import train_small

from fedforget.cli import main
from fedforget.environment import compute_environment, environment_differences
from fedforget.experiments.table import flatten_cell
from fedforget.results import ReferenceRecord
from fedforget.rundir import RESULT_FILE, RunDirectory


def _unlearn(run: Path, method: str, *extra: str,
             capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["unlearn", str(run), "--client", "client-001", "--method", method, "--json",
                 "--quiet", "--shadow-attack", "off", *extra]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_the_environment_names_the_kernels_pytorch_dispatches_to() -> None:
    # ATEN_CPU_CAPABILITY=default makes PyTorch use its unvectorised kernels on any CPU:
    # a process started with it must record those, not what the processor offers
    code = "import json; from fedforget.environment import compute_environment as c; " \
           "print(json.dumps(c()))"
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    env = json.loads(chosen.stdout)
    assert env["cpu_capability"] == "DEFAULT"
    assert env["torch"] == torch.__version__


def test_differences_are_the_entries_that_decide_floats() -> None:
    now = {"torch": "2.13.0", "cpu_capability": "AVX512", "numpy": "2.4.6",
           "machine": "x86_64", "python": "3.11.7"}
    assert environment_differences(None, now) == []  # not recorded: not known to differ
    assert environment_differences(dict(now, python="3.12.1"), now) == []  # not a float key
    assert environment_differences(dict(now, cpu_capability="AVX2"), now) == [
        "cpu_capability: AVX2 -> AVX512"]
    assert environment_differences({"torch": "2.12.0"}, now) == [
        "torch: 2.12.0 -> 2.13.0", "cpu_capability: ? -> AVX512", "numpy: ? -> 2.4.6",
        "machine: ? -> x86_64"]


def test_a_reference_retrained_under_other_kernels_is_said_to_be(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a run, its reference for client-001 computed here
    run = tmp_path / "run"
    train_small(run)
    first = _unlearn(run, "rollback", capsys=capsys)
    here = compute_environment()
    assert first["environment"] == here
    path = RunDirectory(run).reference_dir(["client-001"]) / RESULT_FILE
    assert ReferenceRecord.read(path).environment == here
    same = _unlearn(run, "rollback", "--reference", "cached", capsys=capsys)
    assert same["reference"]["status"] == "cached"
    assert same["reference"]["bit_identical"] is True
    assert not any("another environment" in n for n in same["notes"])
    # Execute: the cached reference as if retrained on an AVX2-only machine
    record = json.loads(path.read_text())
    record["environment"]["cpu_capability"] = "AVX2-elsewhere"
    path.write_text(json.dumps(record))
    other = _unlearn(run, "rollback", "--reference", "cached", capsys=capsys)
    # Assert: still used and compared, with the difference said
    assert other["reference"]["status"] == "cached"
    notes = [n for n in other["notes"] if "another environment" in n]
    assert len(notes) == 1
    assert f"cpu_capability: AVX2-elsewhere -> {here['cpu_capability']}" in notes[0]


def test_results_csv_has_the_environment_per_cell() -> None:
    record = {"cell_id": "c", "experiment": "e", "grid": {}, "seed": 0, "label": "l",
              "method": "m", "forget": ["client-001"], "status": "done",
              "result": {"model_digest": "sha256:ab", "environment": {
                  "torch": "2.13.0", "cpu_capability": "AVX2"}}}
    row = flatten_cell(record)
    assert (row["env_torch"], row["env_cpu_capability"]) == ("2.13.0", "AVX2")
    old = dict(record, result={"model_digest": "sha256:ab"})  # a cell file of before
    assert "env_torch" not in flatten_cell(old)

"""The README's "Extending" examples run as written: a method, a data set and a metric,
used together in a small experiment."""

from __future__ import annotations

import csv
import re
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedforget.data.datasets import DATASETS
from fedforget.experiments import parse_experiment, run_experiment
from fedforget.experiments.metrics import METRICS
from fedforget.tensors import decode
from fedforget.unlearning import METHODS

ROOT = Path(__file__).resolve().parents[1]


def extending_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Extending"):text.index("## Roadmap")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def registered() -> Iterator[dict[str, object]]:
    module = types.ModuleType("readme_examples")  # dataclasses need a real module
    sys.modules[module.__name__] = module
    for block in extending_examples():
        exec(compile(block, "README.md", "exec"), module.__dict__)  # noqa: S102
    try:
        yield module.__dict__
    finally:
        del sys.modules[module.__name__]
        METHODS.remove("shrink")
        DATASETS.remove("blobs")
        METRICS.remove("test-loss-gap")


def test_the_readme_has_an_example_for_a_method_a_data_set_and_a_metric() -> None:
    blocks = extending_examples()
    assert len(blocks) == 3
    assert "@register\n" in blocks[0] and "DATASETS.register(" in blocks[1]
    assert "@register_metric" in blocks[2]


def test_the_readme_examples_work_together_in_an_experiment(
        registered: dict[str, object], tmp_path: Path) -> None:
    spec = parse_experiment(tomllib.loads("""
        [experiment]
        name = "readme"
        seeds = [3]
        forget = ["client-001"]
        metrics = ["test-loss-gap"]
        [run]
        dataset = "blobs"
        num-clients = 3
        num-rounds = 2
        partitioner = "iid"
        model = "logreg"
        history-fsync = false
        [methods.shrink]
        factor = 0.25
    """))

    run_experiment(spec, tmp_path, progress=False, report=False)

    with (tmp_path / "results.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["method"] == "shrink" and row["status"] == "done"
    run_dir = next((tmp_path / "runs").iterdir())
    model = decode(next(run_dir.glob("unlearned/wr-*/shrink/model.fft")).read_bytes())
    from fedforget.history import HistoryStore

    with HistoryStore.open(run_dir) as store:
        first, last = store.global_model(0), store.global_model(store.last_round)
    for key, value in model.items():  # θ0 + 0.25 (θT − θ0), as the example says
        np.testing.assert_allclose(value, first[key] + 0.25 * (last[key] - first[key]),
                                   rtol=1e-6, atol=1e-7)
    # The metric, recomputed here from the two model files.
    from fedforget.arrays import load_tensors
    from fedforget.config import RunConfig
    from fedforget.task import load_test_set, new_model
    from fedforget.training import evaluate

    with HistoryStore.open(run_dir) as store:
        cfg = RunConfig.from_mapping(store.run_config)
    retrained = decode(next(run_dir.glob("unlearned/reference-*/model.fft")).read_bytes())
    test = load_test_set(cfg)
    gap = (evaluate(load_tensors(new_model(cfg), model), test).loss
           - evaluate(load_tensors(new_model(cfg), retrained), test).loss)
    assert float(row["test_loss_gap"]) == pytest.approx(gap, rel=1e-9, abs=1e-12)

"""Shared helpers: small, fast federations on the in-process engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from fedforget.config import RunConfig
from fedforget.engine import run_training
from fedforget.history import HistoryStore
from fedforget.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
# The Flower app components (clients/, server/, strategies/) load from the project root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMALL = {
    "seed": 7,
    "num-rounds": 3,
    "num-clients": 4,
    "dataset": "synthetic",
    "synthetic-samples": 400,
    "partitioner": "iid",
    "model": "mlp",
    "hidden-size": 8,
    "local-epochs": 1,
    "batch-size": 16,
    "learning-rate": 0.1,
}


def small_config(**overrides: Any) -> RunConfig:
    """A 4-client, 3-round synthetic run."""
    values = dict(SMALL)
    values.update(overrides)
    return RunConfig.from_mapping(values)


def run_config_for(cfg: RunConfig, out: Path, **settings: Any) -> dict[str, Any]:
    """The Flower run config of fedforget's app for ``cfg`` writing to ``out`` (quiet),
    with further ``fedforget.*`` settings (e.g. ``mode="unlearn"``)."""
    run = RunSettings(out_dir=str(out), progress=False, **settings)
    return {**cfg.to_mapping(), **run.to_run_config()}


def train_small(out: Path, **overrides: Any) -> dict[str, Any]:
    """Train a small run in-process; return its store summary."""
    run_training(small_config(**overrides), out=out, engine="inprocess", progress=False)
    with HistoryStore.open(out) as store:
        return store.summary()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small finished run, shared read-only by tests that only inspect it."""
    out = tmp_path_factory.mktemp("run") / "run"
    train_small(out)
    return out


def deploy_doc() -> str:
    """The README's Deploy section, its ``###`` subsections as ``##`` (the deployment tests
    run its commands and compare them with what the federation ran)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Deploy")
    end = text.index("\n## ", start + 1)
    return text[start:end].replace("\n### ", "\n## ")

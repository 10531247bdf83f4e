"""Experiments: a TOML file of grids, seeds and methods; a resumable runner; a report.

>>> from fedforget.experiments import load_experiment, run_experiment
>>> spec = load_experiment("simulations/quickstart.toml")
>>> records = run_experiment(spec, "runs/quickstart")          # doctest: +SKIP
"""

from __future__ import annotations

from fedforget.experiments.metrics import METRICS, MetricContext, register_metric
from fedforget.experiments.runner import ExperimentError, read_cells, run_experiment
from fedforget.experiments.spec import ExperimentSpec, load_experiment, parse_experiment

__all__ = [
    "METRICS",
    "ExperimentError",
    "ExperimentSpec",
    "MetricContext",
    "load_experiment",
    "parse_experiment",
    "read_cells",
    "register_metric",
    "run_experiment",
]

"""Extra metrics for experiments: a registry by name.

The standard protocol (accuracies, backdoor, membership inference, distances, per-client
impact, cost) is in every unlearning result already (see ``server/unlearning.py`` and
:mod:`fedforget.evaluation`). A metric registered here is computed by the experiment
runner for every cell of an experiment that lists it in ``[experiment] metrics``::

    from fedforget.experiments.metrics import MetricContext, register_metric

    @register_metric("test-loss-gap")
    def test_loss_gap(ctx: MetricContext) -> float:
        return ctx.loss(ctx.unlearned, ctx.test_set) - ctx.loss(ctx.retrained, ctx.test_set)

A metric returns a number or a mapping of names to numbers (``{"original": ..,
"unlearned": .., "retrained": ..}``); it lands in the results as ``<name>`` or
``<name>_<key>`` columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedforget.arrays import load_tensors
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset
from fedforget.registry import Registry
from fedforget.training import evaluate

__all__ = ["METRICS", "MetricContext", "MetricFn", "compute_metrics", "register_metric"]

TensorDict = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class MetricContext:
    """What a metric can look at for one cell."""

    config: RunConfig  # the run's config
    model: nn.Module  # a scratch module of the run's architecture
    original: TensorDict  # the trained model (before unlearning)
    unlearned: TensorDict  # the method's result
    retrained: TensorDict  # the reference: retrained without the forgotten clients
    test_set: ArrayDataset  # the global test set
    forgotten: ArrayDataset  # the forgotten clients' training data, pooled
    holdout: ArrayDataset  # the forgotten clients' held-out data, pooled
    result: Mapping[str, Any]  # the unlearning's result.json

    def models(self) -> dict[str, TensorDict]:
        """``{"original", "unlearned", "retrained"}``."""
        return {"original": self.original, "unlearned": self.unlearned,
                "retrained": self.retrained}

    def accuracy(self, tensors: TensorDict, data: ArrayDataset) -> float:
        """Accuracy of ``tensors`` on ``data``."""
        return evaluate(load_tensors(self.model, tensors), data).accuracy

    def loss(self, tensors: TensorDict, data: ArrayDataset) -> float:
        """Mean cross-entropy of ``tensors`` on ``data``."""
        return evaluate(load_tensors(self.model, tensors), data).loss


MetricFn = Callable[[MetricContext], "float | Mapping[str, float]"]
METRICS: Registry[MetricFn] = Registry("metric")


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register ``fn`` as the metric ``name`` (``METRICS.register(name)``)."""
    return METRICS.register(name)


def compute_metrics(names: tuple[str, ...] | list[str], ctx: MetricContext) -> dict[str, float]:
    """The named metrics, flattened to ``name`` / ``name_key`` columns."""
    out: dict[str, float] = {}
    for name in names:
        fn = METRICS.get(name)
        with torch.no_grad():
            value = fn(ctx)
        column = name.replace("-", "_")
        if isinstance(value, Mapping):
            for key, v in value.items():
                out[f"{column}_{key}"] = float(v)
        else:
            out[column] = float(value)
    return out


# ------------------------------------------------------------------ built-in examples
@register_metric("holdout-accuracy")
def holdout_accuracy(ctx: MetricContext) -> dict[str, float]:
    """Accuracy on the forgotten clients' *held-out* data: how well each model still fits
    their data distribution, as opposed to their training examples (memorisation)."""
    return {name: ctx.accuracy(t, ctx.holdout) for name, t in ctx.models().items()}


@register_metric("test-loss")
def test_loss(ctx: MetricContext) -> dict[str, float]:
    """Mean cross-entropy on the global test set."""
    return {name: ctx.loss(t, ctx.test_set) for name, t in ctx.models().items()}

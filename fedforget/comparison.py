"""A first comparison of an unlearned model with the original and the retrained one.

Figures (each for the original, unlearned and retrained models where it applies):

* ``test_accuracy``: on the global test set;
* ``forgotten_accuracy``: on the forgotten clients' training data;
* ``backdoor_success``: attack success rate of the trigger planted by a forgotten client
  (test examples not of the target class, triggered; the fraction classified as the target);
* ``l2_to_retrained``: :math:`\\lVert \\theta - \\theta_{retrain} \\rVert_2` over all parameters;
* ``speedup_wall``, ``speedup_client_epochs``: retraining's cost over the method's.

The full evaluation suite (membership inference, divergences, per-client impact) is a
later piece of work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedforget.data import ArrayDataset, backdoor_test_set
from fedforget.task import load_tensors
from fedforget.training import evaluate
from fedforget.unlearning.base import Cost

TensorDict = Mapping[str, np.ndarray]


def l2_distance(a: TensorDict, b: TensorDict) -> float:
    """Euclidean distance between two models over all their parameters."""
    return math.sqrt(
        sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in a)
    )


def accuracy(model: torch.nn.Module, tensors: TensorDict, data: ArrayDataset) -> float:
    """Accuracy of ``tensors`` loaded into ``model`` on ``data``."""
    return evaluate(load_tensors(model, tensors), data).accuracy


def _ratio(reference: float, value: float) -> float | None:
    if value <= 0:
        return None  # the method cost nothing of this kind: no finite speed-up
    return reference / value


@dataclass
class Comparison:
    """The figures of one unlearning run (JSON-ready through :meth:`to_dict`)."""

    test_accuracy: dict[str, float]
    forgotten_accuracy: dict[str, float]
    backdoor_success: dict[str, float] | None
    l2_to_retrained: dict[str, float]
    speedup_wall: float | None
    speedup_client_epochs: float | None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "test_accuracy": self.test_accuracy,
            "forgotten_accuracy": self.forgotten_accuracy,
            "backdoor_success": self.backdoor_success,
            "l2_to_retrained": self.l2_to_retrained,
            "speedup_wall": self.speedup_wall,
            "speedup_client_epochs": self.speedup_client_epochs,
        }


def compare(
    *,
    model: torch.nn.Module,
    original: TensorDict,
    unlearned: TensorDict,
    retrained: TensorDict,
    test_set: ArrayDataset,
    forgotten_data: Sequence[ArrayDataset],
    backdoor_target: int | None,
    method_cost: Cost,
    retrain_cost: Cost,
) -> Comparison:
    """Compare the three models (``model`` is a scratch module of the right architecture)."""
    models = {"original": original, "unlearned": unlearned, "retrained": retrained}
    test_acc = {name: accuracy(model, t, test_set) for name, t in models.items()}
    forgotten: dict[str, float] = {}
    if forgotten_data:
        pooled = ArrayDataset(
            x=np.concatenate([d.x for d in forgotten_data]),
            y=np.concatenate([d.y for d in forgotten_data]),
            num_classes=forgotten_data[0].num_classes,
            name="forgotten",
        )
        forgotten = {name: accuracy(model, t, pooled) for name, t in models.items()}
    backdoor = None
    if backdoor_target is not None:
        triggered = backdoor_test_set(test_set, target_label=backdoor_target)
        backdoor = {name: accuracy(model, t, triggered) for name, t in models.items()}
    return Comparison(
        test_accuracy=test_acc,
        forgotten_accuracy=forgotten,
        backdoor_success=backdoor,
        l2_to_retrained={
            "original": l2_distance(original, retrained),
            "unlearned": l2_distance(unlearned, retrained),
        },
        speedup_wall=_ratio(retrain_cost.server_seconds, method_cost.server_seconds),
        speedup_client_epochs=_ratio(retrain_cost.client_epochs, method_cost.client_epochs),
    )

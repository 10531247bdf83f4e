"""The whole comparison of an unlearned model with the original and the retrained one.

The standard protocol (see the design brief, "What compared against retraining means"):
test accuracy, accuracy on the forgotten data, backdoor attack success, membership
inference on the forgotten data, parameter distance and prediction divergence to the
retrained model, and the effect on each remaining client. Cost figures (wall time,
client-epochs, speed-up) stay in :mod:`fedforget.comparison`, which has the costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from fedforget.comparison import accuracy
from fedforget.data import ArrayDataset, backdoor_test_set
from fedforget.evaluation.divergence import cosine_distance, l2_distance, prediction_divergence
from fedforget.evaluation.errors import EvaluationError
from fedforget.evaluation.impact import client_impact
from fedforget.evaluation.membership import confidence_threshold_auc, loss_threshold_auc
from fedforget.task import load_tensors

TensorDict = Mapping[str, np.ndarray]


def evaluate_unlearning(
    *,
    model: torch.nn.Module,
    original: TensorDict,
    unlearned: TensorDict,
    retrained: TensorDict,
    test_set: ArrayDataset,
    forgotten: ArrayDataset,
    holdout: ArrayDataset,
    backdoor_target: int | None = None,
    client_accuracy_before: Mapping[str, float] | None = None,
    client_accuracy_after: Mapping[str, float] | None = None,
    worst_clients: int = 3,
) -> dict[str, object]:
    """Every figure of the protocol, as a JSON-ready dict.

    Parameters
    ----------
    model : torch.nn.Module
        A scratch module of the right architecture; each model's tensors are loaded in turn.
    original, unlearned, retrained : Mapping[str, numpy.ndarray]
        The three models' tensors.
    test_set : ArrayDataset
        The global test set.
    forgotten : ArrayDataset
        The forgotten clients' training data, pooled (the members of the attacks).
    holdout : ArrayDataset
        Data of the same distribution no model trained on (the non-members).
    backdoor_target : int, optional
        Target class of the trigger a forgotten client planted, if any.
    client_accuracy_before, client_accuracy_after : Mapping[str, float], optional
        Each remaining client's held-out accuracy under the original and the unlearned
        model; both or neither.
    worst_clients : int
        How many of the most hurt clients the impact report names.

    Returns
    -------
    dict
        ``test_accuracy``, ``forgotten_accuracy``, ``backdoor_success`` (or ``None``),
        ``mia_loss_auc``, ``mia_confidence_auc`` — each ``{"original", "unlearned",
        "retrained"}`` —, ``l2_to_retrained``, ``cosine_to_retrained``,
        ``kl_to_retrained`` (:math:`KL(P_{model} \\| P_{retrained})` on the test set),
        ``js_to_retrained`` — each ``{"original", "unlearned"}`` —, and ``client_impact``
        (an :class:`~fedforget.evaluation.impact.ImpactReport` dict, or ``None``).
    """
    if (client_accuracy_before is None) != (client_accuracy_after is None):
        raise EvaluationError(
            "client accuracies given only "
            f"{'before' if client_accuracy_after is None else 'after'} unlearning; "
            "expected both or neither"
        )
    models = {"original": original, "unlearned": unlearned, "retrained": retrained}
    candidates = {"original": original, "unlearned": unlearned}

    def per_model(metric_of: Callable[[torch.nn.Module], float]) -> dict[str, float]:
        return {name: float(metric_of(load_tensors(model, t))) for name, t in models.items()}

    backdoor = None
    if backdoor_target is not None:
        triggered = backdoor_test_set(test_set, target_label=backdoor_target)
        backdoor = {name: accuracy(model, t, triggered) for name, t in models.items()}
    divergences = {
        name: prediction_divergence(model, t, retrained, test_set) for name, t in candidates.items()
    }
    impact = None
    if client_accuracy_before is not None and client_accuracy_after is not None:
        impact = client_impact(
            client_accuracy_before, client_accuracy_after, worst=worst_clients
        ).to_dict()
    return {
        "test_accuracy": {name: accuracy(model, t, test_set) for name, t in models.items()},
        "forgotten_accuracy": {name: accuracy(model, t, forgotten) for name, t in models.items()},
        "backdoor_success": backdoor,
        "mia_loss_auc": per_model(lambda m: loss_threshold_auc(m, forgotten, holdout)),
        "mia_confidence_auc": per_model(lambda m: confidence_threshold_auc(m, forgotten, holdout)),
        "l2_to_retrained": {name: l2_distance(t, retrained) for name, t in candidates.items()},
        "cosine_to_retrained": {
            name: cosine_distance(t, retrained) for name, t in candidates.items()
        },
        "kl_to_retrained": {name: d.kl for name, d in divergences.items()},
        "js_to_retrained": {name: d.js for name, d in divergences.items()},
        "client_impact": impact,
    }

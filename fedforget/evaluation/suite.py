r"""The whole comparison of an unlearned model with the original and the retrained one.

The standard protocol (see the design brief, "What compared against retraining means"):
test accuracy, accuracy on the forgotten data, backdoor attack success, membership
inference on the forgotten data (loss and confidence thresholds, a shadow-model attack),
parameter distance and prediction divergence to the retrained model, and the effect on
each remaining client. :func:`evaluate_unlearning` is the one place these figures are
computed; the cost figures (speed-ups) are in :mod:`fedforget.comparison`, which has the
costs, and :func:`accuracy_trace` follows the test accuracy through the rounds of an
unlearning run.

The attacker of :func:`run_shadow_attack` owns half of the global test set: the test set
is split by a permutation seeded from the run seed into a shadow-train half (the first
:math:`\lfloor N/2 \rfloor` examples of the permutation) and a shadow-out half (the rest);
the shadow model is the run's model, initialised as the run's is, trained on the
shadow-train half with the run's local training (:func:`fedforget.training.train_local`:
its learning rate and batch size) for :data:`SHADOW_EPOCHS` epochs, with a data-order
seed derived from the run seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from fedforget.arrays import load_tensors
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset, backdoor_test_set
from fedforget.evaluation.divergence import cosine_distance, l2_distance, prediction_divergence
from fedforget.evaluation.errors import EvaluationError
from fedforget.evaluation.impact import client_impact
from fedforget.evaluation.membership import (
    ShadowAttack,
    confidence_threshold_auc,
    loss_threshold_auc,
)
from fedforget.sampling import derive_seed
from fedforget.task import new_model
from fedforget.training import evaluate, train_local

TensorDict = Mapping[str, np.ndarray]

SHADOW_EPOCHS = 20
"""Epochs the shadow model of :func:`run_shadow_attack` trains on its half of the test set."""


def accuracy(model: torch.nn.Module, tensors: TensorDict, data: ArrayDataset) -> float:
    """Accuracy of ``tensors`` loaded into ``model`` (a scratch module) on ``data``."""
    return evaluate(load_tensors(model, tensors), data).accuracy


def shadow_halves(test_set: ArrayDataset, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """The attacker's data: ``test_set`` split in two by a permutation seeded with ``seed``.

    Returns the shadow-train half (the first :math:`\\lfloor N/2 \\rfloor` examples of the
    permutation) and the shadow-out half (the other :math:`\\lceil N/2 \\rceil`).

    Raises
    ------
    EvaluationError
        ``test_set`` has fewer than two examples.
    """
    n = len(test_set)
    if n < 2:
        raise EvaluationError(
            f"the test set {test_set.name!r} has {n} examples; the shadow attack needs at "
            "least 2 (one per half)"
        )
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return (test_set.subset(np.sort(order[:half]), name=f"{test_set.name}/shadow-train"),
            test_set.subset(np.sort(order[half:]), name=f"{test_set.name}/shadow-out"))


def run_shadow_attack(
    cfg: RunConfig, test_set: ArrayDataset, *, epochs: int = SHADOW_EPOCHS
) -> ShadowAttack:
    """The shadow-model attack of the run ``cfg``, fitted on halves of ``test_set``.

    Shadow model: :func:`fedforget.task.new_model` (the run's architecture and
    initialisation), trained ``epochs`` epochs on the shadow-train half with the run's
    learning rate and batch size. Split and data order are seeded from ``cfg.seed``
    (``derive_seed(seed, "shadow-attack", "split" | "train")``), the attack model too.
    """
    shadow_train, shadow_out = shadow_halves(
        test_set, derive_seed(cfg.seed, "shadow-attack", "split")
    )

    def train(shadow: torch.nn.Module, data: ArrayDataset) -> None:
        train_local(shadow, data, epochs=epochs, learning_rate=cfg.learning_rate,
                    batch_size=cfg.batch_size, seed=derive_seed(cfg.seed, "shadow-attack",
                                                                "train"))

    return ShadowAttack.fit(
        shadow_train=shadow_train, shadow_out=shadow_out, build_shadow=lambda: new_model(cfg),
        train_shadow=train, seed=derive_seed(cfg.seed, "shadow-attack", "attack") % 2**32,
    )


def accuracy_trace(
    model: torch.nn.Module, snapshots: Iterable[tuple[int, TensorDict]], test_set: ArrayDataset
) -> list[dict[str, float | int]]:
    """Test accuracy of each ``(round, tensors)`` snapshot: ``[{"round", "test_accuracy"}]``.

    ``model`` is a scratch module of the right architecture; the order of ``snapshots``
    is kept.
    """
    return [{"round": int(t), "test_accuracy": accuracy(model, tensors, test_set)}
            for t, tensors in snapshots]


def _cosine_or_none(a: TensorDict, b: TensorDict) -> float | None:
    """:func:`cosine_distance`, or None where a model is all zeros (no direction)."""
    if not all(any(np.any(np.asarray(v) != 0) for v in m.values()) for m in (a, b)):
        return None
    return cosine_distance(a, b)


def evaluate_unlearning(
    *,
    model: torch.nn.Module,
    original: TensorDict,
    unlearned: TensorDict,
    retrained: TensorDict | None,
    test_set: ArrayDataset,
    forgotten: ArrayDataset | None,
    holdout: ArrayDataset | None,
    backdoor_target: int | None = None,
    shadow: ShadowAttack | None = None,
    client_accuracy_before: Mapping[str, float] | None = None,
    client_accuracy_after: Mapping[str, float] | None = None,
    worst_clients: int = 3,
) -> dict[str, object]:
    """Every model-comparison figure of the protocol, as a JSON-ready dict.

    Parameters
    ----------
    model : torch.nn.Module
        A scratch module of the right architecture; each model's tensors are loaded in turn.
    original, unlearned, retrained : Mapping[str, numpy.ndarray]
        The three models' tensors; ``retrained`` None when no reference was computed
        (then every figure is given for the other two, and the figures *to* the retrained
        model are None).
    test_set : ArrayDataset
        The global test set.
    forgotten : ArrayDataset or None
        The forgotten clients' training data, pooled (the members of the attacks); None
        or empty when there is none to measure.
    holdout : ArrayDataset or None
        Data of the same distribution no model trained on (the non-members); None or
        empty when there is none.
    backdoor_target : int, optional
        Target class of the trigger a forgotten client planted, if any.
    shadow : ShadowAttack, optional
        A fitted shadow-model attack (e.g. :func:`run_shadow_attack`), aimed at each of
        the three models with ``forgotten`` as members and ``holdout`` as non-members.
    client_accuracy_before, client_accuracy_after : Mapping[str, float], optional
        Each remaining client's held-out accuracy under the original and the unlearned
        model; both or neither.
    worst_clients : int
        How many of the most hurt clients the impact report names.

    Returns
    -------
    dict
        Each ``{"original", "unlearned", "retrained"}``: ``test_accuracy``,
        ``forgotten_accuracy``, ``backdoor_success``, ``mia_loss_auc``,
        ``mia_confidence_auc``, ``shadow_attack`` (each model's ``{"precision", "recall",
        "auc"}``). Each ``{"original", "unlearned"}``: ``l2_to_retrained``,
        ``cosine_to_retrained``, ``kl_to_retrained`` (:math:`KL(P_{model} \\| P_{retrained})`
        on the test set), ``js_to_retrained``. ``client_impact`` (an
        :class:`~fedforget.evaluation.impact.ImpactReport` dict) and ``client_accuracy``
        (``{"original": {client: accuracy}, "unlearned": {...}}``). A figure that does not
        apply is ``None``: the forgotten-data figures without forgotten data, the attacks
        without members or non-members, ``shadow_attack`` without ``shadow``,
        ``backdoor_success`` without a trigger, the client figures without accuracies, a
        cosine distance to or from an all-zero model (it has no direction).
    """
    if (client_accuracy_before is None) != (client_accuracy_after is None):
        raise EvaluationError(
            "client accuracies given only "
            f"{'before' if client_accuracy_after is None else 'after'} unlearning; "
            "expected both or neither"
        )
    candidates = {"original": original, "unlearned": unlearned}
    models = dict(candidates) if retrained is None else {**candidates, "retrained": retrained}

    def per_model(metric_of: Callable[[torch.nn.Module], float]) -> dict[str, float]:
        return {name: float(metric_of(load_tensors(model, t))) for name, t in models.items()}

    members = forgotten if forgotten is not None and len(forgotten) else None
    non_members = holdout if holdout is not None and len(holdout) else None
    backdoor = None
    if backdoor_target is not None:
        triggered = backdoor_test_set(test_set, target_label=backdoor_target)
        backdoor = {name: accuracy(model, t, triggered) for name, t in models.items()}
    forgotten_accuracy = None
    if members is not None:
        forgotten_accuracy = {name: accuracy(model, t, members) for name, t in models.items()}
    loss_auc = confidence_auc = shadow_report = None
    if members is not None and non_members is not None:
        loss_auc = per_model(lambda m: loss_threshold_auc(m, members, non_members))
        confidence_auc = per_model(lambda m: confidence_threshold_auc(m, members, non_members))
        if shadow is not None:
            shadow_report = {
                name: shadow.attack(load_tensors(model, t), members, non_members).to_dict()
                for name, t in models.items()
            }
    divergences = {} if retrained is None else {
        name: prediction_divergence(model, t, retrained, test_set) for name, t in candidates.items()
    }
    impact = accuracies = None
    if client_accuracy_before is not None and client_accuracy_after is not None:
        impact = client_impact(
            client_accuracy_before, client_accuracy_after, worst=worst_clients
        ).to_dict()
        accuracies = {
            "original": {cid: float(a) for cid, a in client_accuracy_before.items()},
            "unlearned": {cid: float(a) for cid, a in client_accuracy_after.items()},
        }
    return {
        "test_accuracy": {name: accuracy(model, t, test_set) for name, t in models.items()},
        "forgotten_accuracy": forgotten_accuracy,
        "backdoor_success": backdoor,
        "mia_loss_auc": loss_auc,
        "mia_confidence_auc": confidence_auc,
        "shadow_attack": shadow_report,
        "l2_to_retrained": None if retrained is None else {
            name: l2_distance(t, retrained) for name, t in candidates.items()},
        "cosine_to_retrained": None if retrained is None else {
            name: _cosine_or_none(t, retrained) for name, t in candidates.items()},
        "kl_to_retrained": {name: d.kl for name, d in divergences.items()} or None,
        "js_to_retrained": {name: d.js for name, d in divergences.items()} or None,
        "client_impact": impact,
        "client_accuracy": accuracies,
    }

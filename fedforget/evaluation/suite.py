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

from collections.abc import Iterable, Mapping

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
    attack_result,
    per_example_loss,
    precision_recall,
    roc_auc,
)
from fedforget.evaluation.stats import (
    paired_comparison,
    percentile_interval,
    stratified_bootstrap,
)
from fedforget.sampling import derive_seed
from fedforget.task import new_model
from fedforget.training import evaluate, predict_proba, train_local

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
    original_attack: ShadowAttack | None = None,
    forgotten_poisoned: np.ndarray | None = None,
    poisoned_holdout: ArrayDataset | None = None,
    resamples: int = 0,
    seed: int = 0,
    balance: bool = False,
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
    original_attack : ShadowAttack, optional
        FedEraser's attack (:class:`~fedforget.evaluation.membership.OriginalModelAttack`,
        the original model as shadow), aimed like ``shadow``.
    forgotten_poisoned : numpy.ndarray, optional
        Boolean mask over ``forgotten``: the examples that carried a planted trigger. The
        clean and poisoned subsets are then reported apart (``*_clean``, ``*_poisoned``).
    poisoned_holdout : ArrayDataset, optional
        Non-members for the poisoned subset: held-out examples with the same trigger and
        label (never trained on), so that the comparison is like for like.
    resamples : int
        Stratified bootstrap resamples of every membership figure (0: no intervals).
    seed : int
        Seed of the resamples and of the balancing.
    balance : bool
        Measure the membership figures on balanced sets: the larger of ``forgotten`` and
        ``holdout`` subsampled (seeded) to the smaller's size (accuracies and divergences
        keep every example).

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

        Also: ``kl_to_retrained_forgotten`` and ``js_to_retrained_forgotten`` (the
        divergences on the forgotten data); ``original_model_attack`` (each model's
        precision, recall and AUC); ``forgotten_accuracy_clean`` / ``_poisoned`` and
        ``mia_loss_auc_clean`` / ``_poisoned`` (with ``forgotten_poisoned``); with
        ``resamples`` > 0, ``mia_intervals`` (each figure's ``{model: {"estimate", "low",
        "high"}}``, the attacks' ``precision``, ``recall`` and ``auc`` included) and
        ``mia_vs_retrained`` (each figure's ``{"original" | "unlearned": {"difference",
        "low", "high", "within_noise"}}`` from a paired bootstrap: the same resampled
        examples score both models); ``mia_sizes`` (members and non-members counted).
    """
    if (client_accuracy_before is None) != (client_accuracy_after is None):
        raise EvaluationError(
            "client accuracies given only "
            f"{'before' if client_accuracy_after is None else 'after'} unlearning; "
            "expected both or neither"
        )
    candidates = {"original": original, "unlearned": unlearned}
    models = dict(candidates) if retrained is None else {**candidates, "retrained": retrained}

    members = forgotten if forgotten is not None and len(forgotten) else None
    non_members = holdout if holdout is not None and len(holdout) else None
    backdoor = None
    if backdoor_target is not None:
        triggered = backdoor_test_set(test_set, target_label=backdoor_target)
        backdoor = {name: accuracy(model, t, triggered) for name, t in models.items()}
    forgotten_accuracy = None
    if members is not None:
        forgotten_accuracy = {name: accuracy(model, t, members) for name, t in models.items()}
    loss_auc = confidence_auc = shadow_report = original_report = None
    intervals = versus = sizes = None
    if members is not None and non_members is not None:
        if balance:
            from fedforget.evaluation.stats import balanced

            keep_in, keep_out = balanced(len(members), len(non_members), seed=seed)
            mia_in, mia_out = members.subset(keep_in), non_members.subset(keep_out)
        else:
            mia_in, mia_out = members, non_members
        scores = _membership_scores(model, models, mia_in, mia_out,
                                    {"shadow": shadow, "original_model_attack": original_attack})
        loss_auc = {name: roc_auc(*scores["loss"][name]) for name in models}
        confidence_auc = {name: roc_auc(*scores["confidence"][name]) for name in models}
        if shadow is not None:
            shadow_report = {name: attack_result(*scores["shadow"][name],
                                                 shadow.threshold).to_dict()
                             for name in models}
        if original_attack is not None:
            original_report = {name: attack_result(*scores["original_model_attack"][name],
                                                   original_attack.threshold).to_dict()
                               for name in models}
        sizes = {"members": len(mia_in), "non_members": len(mia_out)}
        if resamples > 0:
            thresholds = {"shadow": shadow.threshold if shadow is not None else 0.5,
                          "original_model_attack": (original_attack.threshold
                                                    if original_attack is not None else 0.5)}
            intervals, versus = _bootstrap_figures(scores, thresholds, resamples=resamples,
                                                   seed=seed, len_in=len(mia_in),
                                                   len_out=len(mia_out))
    split = None
    if members is not None and forgotten_poisoned is not None:
        split = _clean_and_poisoned(model, models, members, non_members, poisoned_holdout,
                                    np.asarray(forgotten_poisoned, dtype=bool))
    divergences = {} if retrained is None else {
        name: prediction_divergence(model, t, retrained, test_set) for name, t in candidates.items()
    }
    forgotten_divergences = {} if retrained is None or members is None else {
        name: prediction_divergence(model, t, retrained, members)
        for name, t in candidates.items()
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
        "kl_to_retrained_forgotten": {n: d.kl for n, d in forgotten_divergences.items()} or None,
        "js_to_retrained_forgotten": {n: d.js for n, d in forgotten_divergences.items()} or None,
        "original_model_attack": original_report,
        "mia_intervals": intervals,
        "mia_vs_retrained": versus,
        "mia_sizes": sizes,
        **(split or {}),
    }


Scores = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def _membership_scores(model: torch.nn.Module, models: Mapping[str, TensorDict],
                       members: ArrayDataset, non_members: ArrayDataset,
                       attacks: Mapping[str, ShadowAttack | None]) -> Scores:
    """Per figure and model, the (members', non-members') scores: the loss attack scores
    ``-loss``, the confidence attack ``max p``, the trained attacks their probability."""
    out: Scores = {"loss": {}, "confidence": {}}
    for name, tensors in models.items():
        loaded = load_tensors(model, tensors)
        out["loss"][name] = (-per_example_loss(loaded, members),
                             -per_example_loss(loaded, non_members))
        out["confidence"][name] = (predict_proba(loaded, members.x).max(axis=1),
                                   predict_proba(loaded, non_members.x).max(axis=1))
        for key, attack in attacks.items():
            if attack is not None:
                out.setdefault(key, {})[name] = attack.scores(loaded, members, non_members)
    return out


def _bootstrap_figures(scores: Scores, thresholds: Mapping[str, float], *, resamples: int,
                       seed: int, len_in: int, len_out: int
                       ) -> tuple[dict[str, object], dict[str, object]]:
    """Percentile intervals of every membership figure and the paired differences to the
    retrained model (see :mod:`fedforget.evaluation.stats`)."""
    statistics = {}
    estimates = {}
    for figure, per_model in scores.items():
        for name, (pos, neg) in per_model.items():
            def auc(i: np.ndarray, j: np.ndarray, p: np.ndarray = pos, n: np.ndarray = neg
                    ) -> float:
                return roc_auc(p[i], n[j])
            statistics[(figure, "auc", name)] = auc
            estimates[(figure, "auc", name)] = roc_auc(pos, neg)
            if figure in thresholds:
                cut = thresholds[figure]
                for which in ("precision", "recall"):
                    def call(i: np.ndarray, j: np.ndarray, p: np.ndarray = pos,
                             n: np.ndarray = neg, w: str = which, c: float = cut) -> float:
                        guesses = np.concatenate([p[i] >= c, n[j] >= c])
                        truth = np.concatenate([np.ones(len(i), bool), np.zeros(len(j), bool)])
                        precision, recall = precision_recall(guesses, truth)
                        return precision if w == "precision" else recall
                    statistics[(figure, which, name)] = call
                    estimates[(figure, which, name)] = call(np.arange(len(pos)),
                                                            np.arange(len(neg)))
    keyed = {"/".join(k): v for k, v in statistics.items()}
    samples = stratified_bootstrap(keyed, len_in, len_out, resamples=resamples, seed=seed)
    intervals: dict[str, object] = {}
    versus: dict[str, object] = {}
    for figure, stat, name in statistics:
        label = f"{figure}_auc" if stat == "auc" else f"{figure}_{stat}"
        interval = percentile_interval(samples[f"{figure}/{stat}/{name}"],
                                       estimates[(figure, stat, name)])
        intervals.setdefault(label, {})[name] = interval.to_dict()  # type: ignore[index]
        if name != "retrained" and (figure, stat, "retrained") in statistics:
            comparison = paired_comparison(
                samples[f"{figure}/{stat}/{name}"], samples[f"{figure}/{stat}/retrained"],
                estimates[(figure, stat, name)] - estimates[(figure, stat, "retrained")])
            versus.setdefault(label, {})[name] = comparison.to_dict()  # type: ignore[index]
    return intervals, versus


def _clean_and_poisoned(model: torch.nn.Module, models: Mapping[str, TensorDict],
                        members: ArrayDataset, non_members: ArrayDataset | None,
                        poisoned_holdout: ArrayDataset | None, mask: np.ndarray
                        ) -> dict[str, object]:
    """Accuracy and loss-attack AUC on the clean and the poisoned members apart."""
    if mask.shape != (len(members),):
        raise EvaluationError(f"forgotten_poisoned has shape {mask.shape}; expected "
                              f"({len(members)},), one flag per forgotten example")
    out: dict[str, object] = {}
    for label, keep, outside in (("clean", ~mask, non_members),
                                 ("poisoned", mask, poisoned_holdout)):
        subset = members.subset(np.flatnonzero(keep), name=f"{members.name}/{label}")
        if not len(subset):
            out[f"forgotten_accuracy_{label}"] = out[f"mia_loss_auc_{label}"] = None
            continue
        out[f"forgotten_accuracy_{label}"] = {n: accuracy(model, t, subset)
                                              for n, t in models.items()}
        out[f"mia_loss_auc_{label}"] = None if outside is None or not len(outside) else {
            n: roc_auc(-per_example_loss(load_tensors(model, t), subset),
                       -per_example_loss(load_tensors(model, t), outside))
            for n, t in models.items()}
    return out

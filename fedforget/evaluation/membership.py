r"""Membership inference on the forgotten data: can an attacker still tell it was trained on?

Members are the forgotten clients' training examples, non-members held-out examples of the
same distribution. An attack gives every example a score (higher: more likely a member) and
is measured by the area under its ROC curve, computed exactly as the Mann–Whitney statistic

.. math::

    \mathrm{AUC} = \frac{1}{n_+ n_-} \sum_{i=1}^{n_+} \sum_{j=1}^{n_-}
        \Big( \mathbb{1}[s_i > t_j] + \tfrac12 \mathbb{1}[s_i = t_j] \Big),

where :math:`s_i` are the members' scores and :math:`t_j` the non-members'. An AUC of 0.5
is chance: after exact unlearning the forgotten data look like unseen data, so a good
unlearned model has an AUC near that of the retrained model.

Two attacks need no training (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018,
https://arxiv.org/abs/1709.01604): the per-example cross-entropy
:math:`\ell(x, y) = -\ln p_\theta(y \mid x)` (score :math:`-\ell`, a low loss means member),
and the maximum confidence :math:`\max_k p_\theta(k \mid x)`. The third is the shadow-model
attack of Shokri et al. ("Membership Inference Attacks Against Machine Learning Models",
S&P 2017, https://arxiv.org/abs/1610.05820), with a shadow model trained on data the
attacker owns: see :func:`shadow_attack`. The fourth is FedEraser's own evaluation, whose
shadow is the original global model: see :class:`OriginalModelAttack`. Both classifiers
are evaluated on balanced member and non-member sets by the suite, where a model that
learned nothing about the members gives a precision near 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedforget.data import ArrayDataset
from fedforget.evaluation.attack_models import from_sklearn
from fedforget.evaluation.errors import EvaluationError
from fedforget.training import predict_proba

ATTACK_RECIPE_VERSION = 1
"""Version of the attacks' recipe (their features, :func:`attack_features`, and how their
classifiers are built): raise it with any change to either, so that attacks kept by an
earlier recipe (:mod:`fedforget.measure`) are fitted again, not reused."""

_SHADOW_CLASSIFIER: tuple[str, dict[str, Any]] = (
    "sklearn.linear_model.LogisticRegression", {"class_weight": "balanced", "max_iter": 1000})
_ORIGINAL_MODEL_CLASSIFIER: tuple[str, dict[str, Any]] = (
    "sklearn.ensemble.GradientBoostingClassifier", {})
"""The attacks' classifiers and their parameters besides ``random_state`` (the seed);
scikit-learn's defaults fill the rest, so its version is part of :func:`attack_recipe`."""


def attack_recipe(kind: str) -> dict[str, Any]:
    """What a fitted attack of ``kind`` (``"shadow"`` or ``"original-model"``) depends on
    besides its data and seed: the recipe's version, the classifier and its parameters, and
    the installed scikit-learn's version (from its package metadata, without importing it).

    Raises
    ------
    EvaluationError
        For another ``kind``.
    """
    from importlib.metadata import PackageNotFoundError, version

    recipes = {"shadow": _SHADOW_CLASSIFIER, "original-model": _ORIGINAL_MODEL_CLASSIFIER}
    if kind not in recipes:
        raise EvaluationError(f"no attack {kind!r}; expected one of {', '.join(recipes)}")
    classifier, params = recipes[kind]
    try:
        sklearn = version("scikit-learn")
    except PackageNotFoundError:  # pragma: no cover - a dependency
        sklearn = None
    return {"version": ATTACK_RECIPE_VERSION, "classifier": classifier, "params": params,
            "scikit-learn": sklearn}


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    r"""Exact ROC AUC of scores where positives should score higher (ties count 1/2).

    Counts, for every positive score, the negatives strictly below it and those equal to it
    (binary search in the sorted negatives), so it takes :math:`O((n_+ + n_-) \log n_-)`
    and is exact: :math:`\mathrm{AUC} = \frac{2 \cdot \#\{s > t\} + \#\{s = t\}}{2 n_+ n_-}`.

    Raises
    ------
    EvaluationError
        Either side is empty or has a NaN score.
    """
    pos = np.asarray(scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(scores_neg, dtype=np.float64).ravel()
    for name, arr in (("positive", pos), ("negative", neg)):
        if arr.size == 0:
            raise EvaluationError(f"no {name} scores; expected at least one on each side")
        if np.isnan(arr).any():
            raise EvaluationError(f"{int(np.isnan(arr).sum())} {name} scores are NaN")
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left").astype(np.int64)
    at_or_below = np.searchsorted(neg_sorted, pos, side="right").astype(np.int64)
    twice_u = int(np.sum(below + at_or_below))  # 2 * below + ties, summed
    return twice_u / (2 * pos.size * neg.size)


def per_example_loss(model: nn.Module, data: ArrayDataset, *, batch_size: int = 512) -> np.ndarray:
    r"""Cross-entropy :math:`-\ln p_\theta(y_i \mid x_i)` of every example, ``float64`` ``(N,)``.

    Computed from ``log_softmax`` in ``float64`` (no underflow to an infinite loss), in
    evaluation mode without gradients; the model's training mode is restored after.
    """
    if len(data) == 0:
        raise EvaluationError(f"data set {data.name!r} has no examples; expected at least one")
    x = torch.from_numpy(np.array(data.x, dtype=np.float32))
    y = torch.from_numpy(np.array(data.y, dtype=np.int64))
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                logits = model(x[start : start + batch_size]).double()
                target = y[start : start + batch_size]
                parts.append(F.cross_entropy(logits, target, reduction="none"))
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy()


def loss_threshold_auc(model: nn.Module, members: ArrayDataset, non_members: ArrayDataset) -> float:
    r"""AUC of the loss attack: score :math:`-\ell(x, y)`, members expected to score higher.

    This is the AUC of the best threshold rule "member if :math:`\ell < \tau`" swept over
    every :math:`\tau`. 0.5 is chance; 1.0 means every member has a lower loss than every
    non-member.
    """
    return roc_auc(-per_example_loss(model, members), -per_example_loss(model, non_members))


def confidence_threshold_auc(
    model: nn.Module, members: ArrayDataset, non_members: ArrayDataset
) -> float:
    r"""AUC of the confidence attack: score :math:`\max_k p_\theta(k \mid x)` (labels unused)."""
    for data in (members, non_members):
        if len(data) == 0:
            raise EvaluationError(f"data set {data.name!r} has no examples; expected at least one")
    return roc_auc(
        predict_proba(model, members.x).max(axis=1),
        predict_proba(model, non_members.x).max(axis=1),
    )


def precision_recall(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    r"""Precision :math:`TP / (TP + FP)` and recall :math:`TP / (TP + FN)` of boolean guesses.

    A precision with no positive guess, or a recall with no actual positive, is 0.0
    (scikit-learn's ``zero_division=0``).
    """
    guess = np.asarray(predicted, dtype=bool).ravel()
    truth = np.asarray(actual, dtype=bool).ravel()
    if guess.shape != truth.shape:
        raise EvaluationError(
            f"{guess.size} predictions for {truth.size} labels; expected as many of each"
        )
    tp = int(np.sum(guess & truth))
    guessed = int(guess.sum())
    positives = int(truth.sum())
    return (tp / guessed if guessed else 0.0, tp / positives if positives else 0.0)


@dataclass(frozen=True)
class AttackResult:
    """How well a trained membership attack separates members from non-members.

    Attributes
    ----------
    precision : float
        Of the examples the attack calls members, the fraction that are.
    recall : float
        Of the members, the fraction the attack calls members.
    auc : float
        ROC AUC of the attack's membership probability (threshold-free).
    """

    precision: float
    recall: float
    auc: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready."""
        return {"precision": self.precision, "recall": self.recall, "auc": self.auc}


def attack_features(model: nn.Module, data: ArrayDataset) -> np.ndarray:
    """The attack model's input: each example's softmax vector sorted in decreasing order.

    Sorting makes the features independent of which class is predicted, so one attack
    model serves every class (Shokri et al. train one per class; FedEraser's evaluation,
    like ML-Leaks by Salem et al., NDSS 2019, uses the sorted vector).
    """
    if len(data) == 0:
        raise EvaluationError(f"data set {data.name!r} has no examples; expected at least one")
    probs = predict_proba(model, data.x)
    return -np.sort(-probs, axis=1)


@dataclass(frozen=True)
class ShadowAttack:
    r"""A membership attack learnt on a shadow model (Shokri et al., 2017), ready to aim.

    Fitting it (:meth:`fit`) is the expensive part: the shadow model is trained once and
    the attack model :math:`a(v) = \sigma(w^\top v + b)` learnt on the shadow's
    :func:`attack_features`. The fitted attack is then applied to any number of targets
    with :meth:`attack` (the original, unlearned and retrained models all face the same
    attacker).

    Attributes
    ----------
    classifier : Any
        The fitted scikit-learn ``LogisticRegression`` (membership probability in column 1).
    num_classes : int
        Classes the shadow model predicts (the width of the features).
    threshold : float
        An example is called a member when :math:`a(v) \ge` ``threshold``.
    """

    classifier: Any
    num_classes: int
    threshold: float = 0.5

    @classmethod
    def fit(
        cls,
        *,
        shadow_train: ArrayDataset,
        shadow_out: ArrayDataset,
        build_shadow: Callable[[], nn.Module],
        train_shadow: Callable[[nn.Module, ArrayDataset], Any],
        seed: int,
        threshold: float = 0.5,
    ) -> ShadowAttack:
        """Train the shadow and learn the attack.

        1. Build a shadow model with ``build_shadow()`` and train it with
           ``train_shadow(shadow, shadow_train)`` (the attacker mimics the target's
           training on data it owns).
        2. Label the shadow's :func:`attack_features` on ``shadow_train`` 1 (in) and on
           ``shadow_out`` 0 (out), and fit a logistic-regression attack with balanced
           class weights, seeded by ``seed``.

        Raises
        ------
        EvaluationError
            ``threshold`` is not in (0, 1), or a shadow data set is empty.
        """
        from sklearn.linear_model import LogisticRegression

        if not 0.0 < threshold < 1.0:
            raise EvaluationError(f"threshold = {threshold!r} is out of range; expected 0 < t < 1")
        shadow = build_shadow()
        train_shadow(shadow, shadow_train)
        shadow_in = attack_features(shadow, shadow_train)
        shadow_out_features = attack_features(shadow, shadow_out)
        features = np.concatenate([shadow_in, shadow_out_features])
        labels = np.concatenate(
            [np.ones(len(shadow_in), dtype=np.int64), np.zeros(len(shadow_out_features), np.int64)]
        )
        classifier = LogisticRegression(random_state=seed, **_SHADOW_CLASSIFIER[1])
        classifier.fit(features, labels)
        # Applied as plain arrays (the same probabilities, bit for bit): see attack_models.
        return cls(classifier=from_sklearn(classifier, features) or classifier,
                   num_classes=int(shadow_in.shape[1]), threshold=threshold)

    def attack(
        self, target_model: nn.Module, members: ArrayDataset, non_members: ArrayDataset
    ) -> AttackResult:
        """Apply the attack to ``target_model``'s features on ``members`` and ``non_members``.

        Raises
        ------
        EvaluationError
            A data set is empty, or the target predicts another number of classes than
            the shadow.
        """
        prob_in, prob_out = self.scores(target_model, members, non_members)
        return attack_result(prob_in, prob_out, self.threshold)

    def scores(self, target_model: nn.Module, members: ArrayDataset, non_members: ArrayDataset
               ) -> tuple[np.ndarray, np.ndarray]:
        """The attack's membership probability of every member and non-member."""
        target_in = attack_features(target_model, members)
        target_out = attack_features(target_model, non_members)
        if self.num_classes != target_in.shape[1]:
            raise EvaluationError(
                f"the shadow model predicts {self.num_classes} classes and the target "
                f"{target_in.shape[1]}; expected the same"
            )
        return (self.classifier.predict_proba(target_in)[:, 1],
                self.classifier.predict_proba(target_out)[:, 1])


def attack_result(prob_in: np.ndarray, prob_out: np.ndarray, threshold: float) -> AttackResult:
    """Precision and recall of the calls ``prob >= threshold``, and the AUC of ``prob``."""
    guesses = np.concatenate([prob_in >= threshold, prob_out >= threshold])
    truth = np.concatenate([np.ones(len(prob_in), bool), np.zeros(len(prob_out), bool)])
    precision, recall = precision_recall(guesses, truth)
    return AttackResult(precision=precision, recall=recall, auc=roc_auc(prob_in, prob_out))


@dataclass(frozen=True)
class OriginalModelAttack(ShadowAttack):
    r"""FedEraser's membership attack: the original global model is the shadow.

    FedEraser (Liu et al., IWQoS 2021) evaluates unlearning with an attack whose shadow
    model is the trained global model itself: the attacker knows which examples the
    federation trained on and which it did not, learns from the global model's outputs on
    both, and asks whether the unlearned model still treats the forgotten client's data as
    members. Here:

    1. features: the original model's softmax vectors sorted in decreasing order
       (:func:`attack_features`) on ``members`` (data it trained on: the remaining clients'
       training data) and ``non_members`` (data it never saw), balanced to equal sizes by a
       seeded subsample of the larger side;
    2. classifier: scikit-learn's ``GradientBoostingClassifier`` (FedEraser uses XGBoost,
       a gradient-boosted tree ensemble), seeded;
    3. applied like :class:`ShadowAttack` to any target model (:meth:`attack`).

    The attack is fitted on clients that *stay*, so it never saw the forgotten examples.
    """

    @classmethod
    def fit_on_original(
        cls,
        *,
        original: nn.Module,
        members: ArrayDataset,
        non_members: ArrayDataset,
        seed: int,
        threshold: float = 0.5,
    ) -> OriginalModelAttack:
        """Fit the gradient-boosted attack on ``original``'s outputs (see the class).

        Raises
        ------
        EvaluationError
            ``threshold`` is not in (0, 1), or a data set is empty.
        """
        from sklearn.ensemble import GradientBoostingClassifier

        from fedforget.evaluation.stats import balanced

        if not 0.0 < threshold < 1.0:
            raise EvaluationError(f"threshold = {threshold!r} is out of range; expected 0 < t < 1")
        keep_in, keep_out = balanced(len(members), len(non_members), seed=seed)
        features_in = attack_features(original, members.subset(keep_in))
        features_out = attack_features(original, non_members.subset(keep_out))
        features = np.concatenate([features_in, features_out])
        labels = np.concatenate([np.ones(len(features_in), np.int64),
                                 np.zeros(len(features_out), np.int64)])
        classifier = GradientBoostingClassifier(random_state=seed,
                                                **_ORIGINAL_MODEL_CLASSIFIER[1])
        classifier.fit(features, labels)
        return cls(classifier=from_sklearn(classifier, features) or classifier,
                   num_classes=int(features.shape[1]), threshold=threshold)


def shadow_attack(
    target_model: nn.Module,
    members: ArrayDataset,
    non_members: ArrayDataset,
    *,
    shadow_train: ArrayDataset,
    shadow_out: ArrayDataset,
    build_shadow: Callable[[], nn.Module],
    train_shadow: Callable[[nn.Module, ArrayDataset], Any],
    seed: int,
    threshold: float = 0.5,
) -> AttackResult:
    r"""Shadow-model membership inference (Shokri et al., 2017) against ``target_model``.

    :meth:`ShadowAttack.fit` then :meth:`ShadowAttack.attack`:

    1. Build a shadow model with ``build_shadow()`` and train it with
       ``train_shadow(shadow, shadow_train)`` (the attacker mimics the target's training
       on data it owns).
    2. Label the shadow's :func:`attack_features` on ``shadow_train`` 1 (in) and on
       ``shadow_out`` 0 (out), and fit a logistic-regression attack
       :math:`a(v) = \sigma(w^\top v + b)` with balanced class weights, seeded by ``seed``.
    3. Apply it to the target's features on ``members`` and ``non_members``: an example is
       called a member when :math:`a(v) \ge` ``threshold``.

    Everything is deterministic given the data, ``seed`` and a deterministic
    ``train_shadow``.

    Returns
    -------
    AttackResult
        Precision and recall of the member calls, and the AUC of :math:`a(v)`.

    Raises
    ------
    EvaluationError
        A data set is empty, or the shadow and target models have different class counts.
    """
    fitted = ShadowAttack.fit(
        shadow_train=shadow_train, shadow_out=shadow_out, build_shadow=build_shadow,
        train_shadow=train_shadow, seed=seed, threshold=threshold,
    )
    return fitted.attack(target_model, members, non_members)

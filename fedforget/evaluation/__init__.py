"""Evaluation of unlearning against retraining: one module per family of metrics.

* :mod:`~fedforget.evaluation.membership`: membership inference on the forgotten data
  (loss and confidence thresholds, shadow-model attack);
* :mod:`~fedforget.evaluation.divergence`: parameter distance (L2, cosine) and prediction
  divergence (KL, JS);
* :mod:`~fedforget.evaluation.impact`: the accuracy change of each remaining client;
* :mod:`~fedforget.evaluation.stats`: bootstrap intervals of the membership figures and
  whether a difference to retraining is within noise;
* :mod:`~fedforget.evaluation.suite`: everything at once, JSON-ready; the run's shadow
  attack; the accuracy trace of an unlearning run.
"""

from __future__ import annotations

from fedforget.evaluation.divergence import (
    KL_EPSILON,
    PredictionDivergence,
    cosine_distance,
    js_divergence,
    kl_divergence,
    l2_distance,
    prediction_divergence,
)
from fedforget.evaluation.errors import EvaluationError
from fedforget.evaluation.impact import ImpactReport, client_impact
from fedforget.evaluation.membership import (
    AttackResult,
    OriginalModelAttack,
    ShadowAttack,
    attack_features,
    attack_result,
    confidence_threshold_auc,
    loss_threshold_auc,
    per_example_loss,
    precision_recall,
    roc_auc,
    shadow_attack,
)
from fedforget.evaluation.stats import (
    Comparison,
    Interval,
    balanced,
    paired_comparison,
    percentile_interval,
    stratified_bootstrap,
    within_noise_across_seeds,
)
from fedforget.evaluation.suite import (
    SHADOW_EPOCHS,
    accuracy,
    accuracy_trace,
    evaluate_unlearning,
    run_shadow_attack,
    shadow_halves,
)

__all__ = [
    "KL_EPSILON",
    "SHADOW_EPOCHS",
    "AttackResult",
    "Comparison",
    "Interval",
    "OriginalModelAttack",
    "EvaluationError",
    "ImpactReport",
    "PredictionDivergence",
    "ShadowAttack",
    "accuracy",
    "accuracy_trace",
    "attack_features",
    "attack_result",
    "balanced",
    "client_impact",
    "confidence_threshold_auc",
    "cosine_distance",
    "evaluate_unlearning",
    "js_divergence",
    "kl_divergence",
    "l2_distance",
    "loss_threshold_auc",
    "paired_comparison",
    "percentile_interval",
    "per_example_loss",
    "precision_recall",
    "prediction_divergence",
    "roc_auc",
    "run_shadow_attack",
    "shadow_attack",
    "shadow_halves",
    "stratified_bootstrap",
    "within_noise_across_seeds",
]

r"""How far an unlearned model is from the retrained one: in parameters and in predictions.

Parameter distances treat a model as the concatenation :math:`\theta \in \mathbb{R}^P` of
all its tensors (in ``float64``):

.. math::

    d_{L2}(\theta, \theta') = \lVert \theta - \theta' \rVert_2, \qquad
    d_{\cos}(\theta, \theta') = 1 - \frac{\langle \theta, \theta' \rangle}
                                         {\lVert \theta \rVert_2 \lVert \theta' \rVert_2}.

Prediction divergences compare the softmax outputs :math:`P(\cdot \mid x)` and
:math:`Q(\cdot \mid x)` of two models example by example and average over a data set
(natural logarithm, so the Jensen–Shannon divergence lies in :math:`[0, \ln 2]`):

.. math::

    \mathrm{KL}(P \,\|\, Q) = \sum_k p_k \ln \frac{p_k}{\max(q_k, \epsilon)}, \qquad
    \mathrm{JS}(P, Q) = \tfrac12 \mathrm{KL}(P \,\|\, M) + \tfrac12 \mathrm{KL}(Q \,\|\, M),
    \quad M = \tfrac12 (P + Q),

with the convention :math:`0 \ln(0 / q) = 0`. The clamp :math:`\epsilon` (default
:data:`KL_EPSILON`) only keeps :math:`\mathrm{KL}` finite where :math:`Q` gives an
outcome zero probability (a softmax underflow); JS needs no clamp, since :math:`m_k > 0`
wherever :math:`p_k > 0`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedforget.arrays import load_tensors
from fedforget.data import ArrayDataset
from fedforget.evaluation.errors import EvaluationError
from fedforget.training import predict_proba

TensorDict = Mapping[str, np.ndarray]

KL_EPSILON = 1e-12
"""Lower clamp of :math:`q_k` in :func:`kl_divergence`."""


def _flatten_pair(a: TensorDict, b: TensorDict) -> tuple[np.ndarray, np.ndarray]:
    """Both models as one ``float64`` vector each, in ``a``'s key order (same keys, shapes)."""
    if set(a) != set(b):
        raise EvaluationError(
            f"the two models have different tensors: only in the first {sorted(set(a) - set(b))}, "
            f"only in the second {sorted(set(b) - set(a))}; expected the same keys"
        )
    for key in a:
        if np.shape(a[key]) != np.shape(b[key]):
            raise EvaluationError(
                f"tensor {key!r} has shape {np.shape(a[key])} in the first model and "
                f"{np.shape(b[key])} in the second; expected the same shape"
            )
    if not a:
        return np.zeros(0), np.zeros(0)
    flat_a = np.concatenate([np.asarray(a[k], dtype=np.float64).ravel() for k in a])
    flat_b = np.concatenate([np.asarray(b[k], dtype=np.float64).ravel() for k in a])
    return flat_a, flat_b


def l2_distance(a: TensorDict, b: TensorDict) -> float:
    r""":math:`\lVert \theta_a - \theta_b \rVert_2` over all parameters (same keys and shapes)."""
    flat_a, flat_b = _flatten_pair(a, b)
    return float(np.linalg.norm(flat_a - flat_b))


def cosine_distance(a: TensorDict, b: TensorDict) -> float:
    r""":math:`1 - \cos(\theta_a, \theta_b)`, in :math:`[0, 2]`.

    Raises
    ------
    EvaluationError
        Either model is all zeros (its direction is undefined), or the keys or shapes differ.
    """
    flat_a, flat_b = _flatten_pair(a, b)
    norm_a = float(np.linalg.norm(flat_a))
    norm_b = float(np.linalg.norm(flat_b))
    if norm_a == 0.0 or norm_b == 0.0:
        raise EvaluationError(
            f"cosine distance is undefined for a zero model (norms {norm_a} and {norm_b}); "
            "expected two non-zero parameter vectors"
        )
    cosine = float(np.dot(flat_a, flat_b)) / (norm_a * norm_b)
    return 1.0 - min(1.0, max(-1.0, cosine))


def _check_distributions(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    q = np.atleast_2d(np.asarray(q, dtype=np.float64))
    if p.shape != q.shape or p.ndim != 2:
        raise EvaluationError(
            f"distributions of shapes {p.shape} and {q.shape}; expected the same (N, K)"
        )
    for name, arr in (("P", p), ("Q", q)):
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise EvaluationError(f"{name} has negative or non-finite entries; expected >= 0")
        sums = arr.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-6):
            worst = float(sums[np.argmax(np.abs(sums - 1.0))])
            raise EvaluationError(f"a row of {name} sums to {worst}; expected 1")
    return p, q


def _kl_rows(p: np.ndarray, q: np.ndarray, epsilon: float) -> np.ndarray:
    safe_q = np.maximum(q, epsilon)
    safe_p = np.where(p > 0, p, 1.0)  # log(1) = 0 where p = 0: the 0 ln 0 = 0 convention
    terms: np.ndarray = np.where(p > 0, p * np.log(safe_p / safe_q), 0.0)
    return terms.sum(axis=1)


def kl_divergence(p: np.ndarray, q: np.ndarray, *, epsilon: float = KL_EPSILON) -> np.ndarray:
    r"""Row-wise :math:`\mathrm{KL}(P \,\|\, Q)` in nats, shape ``(N,)``.

    Parameters
    ----------
    p, q : numpy.ndarray
        Probability rows, shape ``(N, K)`` (or ``(K,)`` for one pair); each row sums to 1.
    epsilon : float
        Lower clamp of :math:`q_k`, ``> 0``.
    """
    if not epsilon > 0:
        raise EvaluationError(f"epsilon = {epsilon!r} is out of range; expected > 0")
    p, q = _check_distributions(p, q)
    return _kl_rows(p, q, epsilon)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    r"""Row-wise Jensen–Shannon divergence in nats, in :math:`[0, \ln 2]`, shape ``(N,)``."""
    p, q = _check_distributions(p, q)
    m = 0.5 * (p + q)
    # m_k >= p_k / 2 > 0 wherever p_k > 0, so the clamp never acts here.
    js = 0.5 * _kl_rows(p, m, KL_EPSILON) + 0.5 * _kl_rows(q, m, KL_EPSILON)
    return np.clip(js, 0.0, math.log(2.0))


@dataclass(frozen=True)
class PredictionDivergence:
    """Mean :math:`\\mathrm{KL}(P \\| Q)` and :math:`\\mathrm{JS}(P, Q)` over a data set (nats)."""

    kl: float
    js: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready."""
        return {"kl": self.kl, "js": self.js}


def prediction_divergence(
    model: torch.nn.Module, p_tensors: TensorDict, q_tensors: TensorDict, data: ArrayDataset
) -> PredictionDivergence:
    r"""Mean KL and JS between the predictions of two weightings of ``model`` on ``data``.

    .. math::

        \overline{\mathrm{KL}} = \frac{1}{N} \sum_{i=1}^{N}
            \mathrm{KL}\big(P(\cdot \mid x_i) \,\|\, Q(\cdot \mid x_i)\big),

    and likewise for JS, where :math:`P` is ``model`` with ``p_tensors`` loaded and
    :math:`Q` with ``q_tensors``. ``model`` is a scratch module of the right architecture;
    its weights are overwritten.

    Raises
    ------
    EvaluationError
        ``data`` is empty.
    """
    if len(data) == 0:
        raise EvaluationError(f"data set {data.name!r} has no examples; expected at least one")
    p = predict_proba(load_tensors(model, p_tensors), data.x)
    q = predict_proba(load_tensors(model, q_tensors), data.x)
    return PredictionDivergence(
        kl=float(np.mean(_kl_rows(p, q, KL_EPSILON))),
        js=float(np.mean(js_divergence(p, q))),
    )

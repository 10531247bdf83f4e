r"""Who else is hurt: each remaining client's loss against its similarity to the forgotten data.

Unlearning removes what the forgotten data taught the model, and the clients whose data
resemble it lose most (a district that leaves a shared speech model takes with it what the
model knew of its accent). For every remaining client :math:`k` with held-out accuracies
:math:`a_k` (original model) and :math:`b_k` (unlearned model) on :math:`n_k` examples,

.. math::

    h_k = a_k - b_k \qquad \text{(the harm: accuracy points lost)},

and two similarities to the forgotten data :math:`F`:

* **label similarity** :math:`s^{lab}_k = 1 - \mathrm{TV}(p_k, p_F)
  = 1 - \tfrac12 \sum_c |p_k(c) - p_F(c)|`, between the client's training label
  distribution and the forgotten data's;
* **representation similarity** :math:`s^{rep}_k = \cos(\bar z_k - \bar z_0,\;
  \bar z_F - \bar z_0)`, where :math:`\bar z` is the mean penultimate representation (the
  input of the model's last linear layer) under the *original* model, of the client's
  training data, of the forgotten data and of the server's test set (:math:`\bar z_0`, the
  centre: without it every ReLU representation points the same way).

Figures (:func:`collateral_report`):

* the **correlation** of each similarity with the harm, Pearson's :math:`r` over the
  clients, with a :math:`1-\alpha` confidence interval by Fisher's transformation,
  :math:`\tanh(\operatorname{atanh} r \pm z_{1-\alpha/2} / \sqrt{K - 3})` (none below
  four clients); :math:`r > 0` means the more similar a client, the more it lost;
* the **hurt group**: the clients whose harm is significantly larger than the rest's. For
  each client the one-sided test of :math:`h_k > \bar h_{-k}` (the mean harm of the other
  clients) uses

  .. math::

      z_k = \frac{h_k - \bar h_{-k}}{\sqrt{\sigma_k^2 + s_{-k}^2 / (K - 1)}}, \qquad
      \sigma_k^2 = \frac{a_k(1-a_k) + b_k(1-b_k)}{n_k},

  :math:`\sigma_k` the binomial standard error of the change (conservative: it ignores that
  both accuracies are measured on the same examples) and :math:`s_{-k}` the spread of the
  other clients' harms; the p-values are corrected for the :math:`K` tests by Holm's
  step-down procedure at level :math:`\alpha`; the group is named, most hurt first;
* with client groups (``groups`` in the run config), each group's mean harm with a
  :math:`1-\alpha` t-interval over its clients.

In a simulation the server may build the clients' data to compute all this; in a
deployment every per-client figure comes from the client's own evaluation
(:mod:`fedforget.evaluation.profile`), and the server sees only the figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from fedforget.evaluation.errors import EvaluationError

__all__ = ["ALPHA", "ClientProfile", "CollateralReport", "collateral_report", "correlation",
           "holm", "mean_interval"]

ALPHA = 0.05
"""Level of the tests and of the confidence intervals (95 %)."""


@dataclass(frozen=True)
class ClientProfile:
    """One remaining client's figures (from its own evaluation in a deployment)."""

    client_id: str
    accuracy_before: float
    accuracy_after: float
    num_examples: int
    label_similarity: float | None = None
    representation_similarity: float | None = None
    group: int | None = None

    @property
    def harm(self) -> float:
        """:math:`h_k = a_k - b_k`."""
        return self.accuracy_before - self.accuracy_after

    @property
    def standard_error(self) -> float:
        """:math:`\\sigma_k` (see the module)."""
        a, b, n = self.accuracy_before, self.accuracy_after, max(self.num_examples, 1)
        return math.sqrt((a * (1 - a) + b * (1 - b)) / n)


@dataclass(frozen=True)
class Correlation:
    """Pearson's r with its confidence interval (None where undefined)."""

    r: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"r": self.r, "low": self.low, "high": self.high, "n": self.n}


@dataclass(frozen=True)
class CollateralReport:
    """The figures of the module docstring."""

    clients: list[ClientProfile]
    label: Correlation
    representation: Correlation
    hurt: list[str]
    p_values: dict[str, float]
    groups: dict[int, dict[str, Any]] = field(default_factory=dict)
    alpha: float = ALPHA

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``result.json`` ``metrics.collateral``)."""
        return {
            "alpha": self.alpha,
            "clients": {c.client_id: {
                "harm": c.harm, "standard_error": c.standard_error,
                "accuracy_before": c.accuracy_before, "accuracy_after": c.accuracy_after,
                "num_examples": c.num_examples, "label_similarity": c.label_similarity,
                "representation_similarity": c.representation_similarity,
                "group": c.group, "p_value": self.p_values.get(c.client_id),
            } for c in self.clients},
            "correlation": {"label": self.label.to_dict(),
                            "representation": self.representation.to_dict()},
            "hurt": list(self.hurt),
            "hurt_mean_harm": (_mean([c.harm for c in self.clients if c.client_id in self.hurt])
                               if self.hurt else None),
            "others_mean_harm": _mean([c.harm for c in self.clients
                                       if c.client_id not in self.hurt]),
            "groups": {str(g): v for g, v in sorted(self.groups.items())},
        }


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def correlation(x: Sequence[float], y: Sequence[float], *, alpha: float = ALPHA) -> Correlation:
    """Pearson's r of ``x`` and ``y`` with the Fisher-z interval (module docstring).

    r is None when either has no spread or fewer than 2 points; the interval needs 4.
    """
    if len(x) != len(y):
        raise EvaluationError(f"{len(x)} values against {len(y)}; expected pairs")
    n = len(x)
    if n < 2:
        return Correlation(None, None, None, n)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((v - mx) ** 2 for v in x)
    syy = math.fsum((v - my) ** 2 for v in y)
    if sxx <= 0 or syy <= 0:
        return Correlation(None, None, None, n)
    r = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / math.sqrt(sxx * syy)
    r = max(-1.0, min(1.0, r))
    if n < 4:
        return Correlation(r, None, None, n)
    z = NormalDist().inv_cdf(1 - alpha / 2) / math.sqrt(n - 3)
    centre = math.atanh(max(-0.999999999, min(0.999999999, r)))
    return Correlation(r, math.tanh(centre - z), math.tanh(centre + z), n)


def holm(p_values: Mapping[str, float], *, alpha: float = ALPHA) -> list[str]:
    """The hypotheses rejected by Holm's step-down procedure, smallest p first: sort the
    :math:`m` p-values, reject while :math:`p_{(i)} \\le \\alpha / (m - i + 1)`."""
    ranked = sorted(p_values.items(), key=lambda item: (item[1], item[0]))
    m = len(ranked)
    out: list[str] = []
    for i, (name, p) in enumerate(ranked):
        if p > alpha / (m - i):
            break
        out.append(name)
    return out


def mean_interval(values: Sequence[float], *, alpha: float = ALPHA
                  ) -> tuple[float | None, float | None, float | None]:
    """Mean and t-interval :math:`\\bar x \\pm t_{n-1, 1-\\alpha/2}\\, s/\\sqrt n`
    (no interval for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, None
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(1 - alpha / 2, n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half


def t_quantile(q: float, dof: int) -> float:
    """Student's t quantile (scipy's when available, else a Cornish-Fisher expansion)."""
    try:
        from scipy.stats import t

        return float(t.ppf(q, dof))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        z = NormalDist().inv_cdf(q)
        g1 = (z ** 3 + z) / 4
        g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
        return z + g1 / dof + g2 / dof ** 2


def _p_value(k: ClientProfile, rest: Sequence[ClientProfile]) -> float:
    harms = [c.harm for c in rest]
    mean = math.fsum(harms) / len(harms)
    spread = (math.fsum((h - mean) ** 2 for h in harms) / (len(harms) - 1)
              if len(harms) > 1 else 0.0)
    scale = math.sqrt(k.standard_error ** 2 + spread / len(harms))
    diff = k.harm - mean
    if scale == 0:
        return 0.0 if diff > 0 else 1.0
    return 1 - NormalDist().cdf(diff / scale)


def collateral_report(profiles: Sequence[ClientProfile], *, alpha: float = ALPHA
                      ) -> CollateralReport:
    """Correlations, the hurt group and the group figures (module docstring).

    Raises
    ------
    EvaluationError
        No client, a client named twice, or an accuracy outside [0, 1].
    """
    if not profiles:
        raise EvaluationError("no remaining client to report on; expected at least one")
    if not 0 < alpha < 1:
        raise EvaluationError(f"alpha = {alpha!r}; expected 0 < alpha < 1")
    ids = [p.client_id for p in profiles]
    if len(set(ids)) != len(ids):
        raise EvaluationError(f"clients {sorted(ids)} repeat; expected each once")
    for p in profiles:
        for what, a in (("before", p.accuracy_before), ("after", p.accuracy_after)):
            if not (isinstance(a, int | float) and math.isfinite(a) and 0 <= a <= 1):
                raise EvaluationError(f"accuracy {what} of client {p.client_id!r} is {a!r}; "
                                      "expected a number in [0, 1]")
    clients = sorted(profiles, key=lambda p: p.client_id)

    def corr(attribute: str) -> Correlation:
        pairs = [(getattr(c, attribute), c.harm) for c in clients
                 if getattr(c, attribute) is not None]
        return correlation([s for s, _ in pairs], [h for _, h in pairs], alpha=alpha)

    p_values: dict[str, float] = {}
    if len(clients) >= 2:
        for k in clients:
            p_values[k.client_id] = _p_value(k, [c for c in clients if c is not k])
    rejected = set(holm(p_values, alpha=alpha))
    hurt = [c.client_id for c in sorted(clients, key=lambda c: (-c.harm, c.client_id))
            if c.client_id in rejected]
    groups: dict[int, dict[str, Any]] = {}
    for g in sorted({c.group for c in clients if c.group is not None}):
        mean, low, high = mean_interval([c.harm for c in clients if c.group == g], alpha=alpha)
        groups[g] = {"clients": [c.client_id for c in clients if c.group == g],
                     "mean_harm": mean, "low": low, "high": high}
    return CollateralReport(clients=clients, label=corr("label_similarity"),
                            representation=corr("representation_similarity"), hurt=hurt,
                            p_values=p_values, groups=groups, alpha=alpha)

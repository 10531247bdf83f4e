r"""Uncertainty of the membership figures: stratified bootstrap intervals and noise tests.

A membership-inference figure is computed on a few dozen to a few hundred examples, so its
sampling error matters: an AUC over 36 members and 36 non-members has a standard error near
0.05, and a gap of 0.004 between a method and retraining says nothing. Every figure gets a
percentile bootstrap interval, resampling members and non-members separately (with
replacement, each to its own size: a stratified bootstrap, so that the member ratio is
fixed), and a method's figure is compared with retraining's by a *paired* bootstrap: the
same resampled examples score both models, the difference :math:`d^{(b)} = f_u^{(b)} -
f_r^{(b)}` is recorded for every resample :math:`b`, and the difference is **within noise**
when its :math:`(1-\alpha)` interval contains 0.

Across seeds, :func:`within_noise_across_seeds` compares two sets of per-seed values with
the standard error of the difference of their means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedforget.evaluation.errors import EvaluationError

DEFAULT_RESAMPLES = 1000
"""Bootstrap resamples of the figures (percentile intervals)."""
DEFAULT_LEVEL = 0.95
"""Confidence level of the intervals."""

Statistic = Callable[[np.ndarray, np.ndarray], float]
"""``statistic(member_index, non_member_index) -> value`` on a resample."""


@dataclass(frozen=True)
class Interval:
    """A figure and its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    def to_dict(self) -> dict[str, float]:
        """JSON-ready: ``{"estimate", "low", "high"}``."""
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Comparison:
    """A method's figure minus the reference's, with the paired bootstrap interval."""

    difference: float
    low: float
    high: float
    within_noise: bool

    def to_dict(self) -> dict[str, float | bool]:
        """JSON-ready."""
        return {"difference": self.difference, "low": self.low, "high": self.high,
                "within_noise": self.within_noise}


def stratified_bootstrap(
    statistics: Mapping[str, Statistic], n_members: int, n_non_members: int, *,
    resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each statistic on ``resamples`` stratified resamples, the same resamples for all.

    Raises
    ------
    EvaluationError
        Either side is empty or ``resamples`` < 1.
    """
    if n_members < 1 or n_non_members < 1:
        raise EvaluationError(
            f"{n_members} members and {n_non_members} non-members; expected at least one each")
    if resamples < 1:
        raise EvaluationError(f"resamples = {resamples!r} is out of range; expected >= 1")
    rng = np.random.default_rng(seed)
    out = {name: np.empty(resamples) for name in statistics}
    for b in range(resamples):
        pos = rng.integers(0, n_members, n_members)
        neg = rng.integers(0, n_non_members, n_non_members)
        for name, statistic in statistics.items():
            out[name][b] = statistic(pos, neg)
    return out


def percentile_interval(samples: np.ndarray, estimate: float,
                        level: float = DEFAULT_LEVEL) -> Interval:
    """The ``level`` percentile interval of bootstrap ``samples`` around ``estimate``."""
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"level = {level!r} is out of range; expected 0 < level < 1")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Interval(estimate, math.nan, math.nan, level)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), level)


def paired_comparison(method: np.ndarray, reference: np.ndarray, difference: float,
                      level: float = DEFAULT_LEVEL) -> Comparison:
    """``method - reference`` from paired bootstrap samples; within noise if the interval
    of the difference contains 0."""
    interval = percentile_interval(np.asarray(method) - np.asarray(reference), difference, level)
    within = bool(interval.low <= 0.0 <= interval.high) if math.isfinite(interval.low) else True
    return Comparison(float(difference), interval.low, interval.high, within)


def within_noise_across_seeds(values: Sequence[float], reference: Sequence[float], *,
                              z: float = 2.0) -> Comparison:
    r"""Whether two per-seed means differ by more than noise.

    .. math::

        d = \bar a - \bar b, \qquad
        \mathrm{SE} = \sqrt{s_a^2 / n_a + s_b^2 / n_b}, \qquad
        \text{within noise} \iff |d| \le z\,\mathrm{SE}

    with sample standard deviations :math:`s` (0 for a single value); the interval is
    :math:`d \pm z\,\mathrm{SE}`. Identical values give SE 0: within noise only if equal.
    """
    a = np.asarray(values, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise EvaluationError("no values to compare; expected at least one on each side")
    var_a = float(a.var(ddof=1)) if a.size > 1 else 0.0
    var_b = float(b.var(ddof=1)) if b.size > 1 else 0.0
    se = math.sqrt(var_a / a.size + var_b / b.size)
    d = float(a.mean() - b.mean())
    return Comparison(d, d - z * se, d + z * se, abs(d) <= z * se)


def balanced(n_members: int, n_non_members: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index sets of equal size: the larger side subsampled (seeded, without replacement)
    to the smaller side's size, indices sorted."""
    size = min(n_members, n_non_members)
    rng = np.random.default_rng(seed)

    def pick(n: int) -> np.ndarray:
        if n == size:
            return np.arange(n)
        return np.sort(rng.choice(n, size=size, replace=False))

    return pick(n_members), pick(n_non_members)

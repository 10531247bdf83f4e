"""FedRecovery: subtract the weighted gradient residuals, then add calibrated Gaussian noise.

Zhang et al., "FedRecovery: Differentially Private Machine Unlearning for Federated
Learning Frameworks", IEEE TIFS 18, 2023, https://doi.org/10.1109/TIFS.2023.3240209.

With :math:`g_t = \\theta_t - \\theta_{t-1} = \\sum_k w_{t,k}\\Delta_{t,k}` the aggregated
update of round t (the paper's global gradient step :math:`\\nabla F_t`), the gradient
residual of round t is the change to :math:`g_t` when the forgotten clients :math:`F`
leave it and the remaining weights are renormalised,

.. math::

    r_t = \\sum_{k \\notin F} \\frac{W_t\\, w_{t,k}}{\\sum_{j \\notin F} w_{t,j}}
          \\Delta_{t,k} - g_t, \\qquad W_t = \\sum_k w_{t,k}

(zero in rounds without a forgotten client), and the unlearned model is

.. math::

    \\tilde\\theta = \\theta_T + \\sum_t p_t r_t + \\mathcal N(0, \\sigma^2 I), \\qquad
    p_t = \\frac{\\lVert g_t \\rVert_2^2}{\\sum_{j=1}^{T} \\lVert g_j \\rVert_2^2}, \\qquad
    \\sigma = \\frac{S}{\\varepsilon}\\sqrt{2 \\ln(1.25/\\delta)}

(the paper's weights, which sum to 1 over the T rounds: the residuals are *averaged*,
weighted by how large each round's step was; ``weights = "unit"`` keeps the earlier
:math:`p_t = 1`, under which the deterministic part equals
:mod:`subtract <fedforget.unlearning.subtract>`), with the Gaussian mechanism of Dwork and
Roth (Theorem A.1, proven for :math:`\\varepsilon < 1`) of ℓ2 sensitivity :math:`S`.
``sigma`` > 0 sets :math:`\\sigma` directly (then ε, δ and S are not used).

What is implemented, and where it deviates:

- :math:`p_t` is computed from the stored global models (:math:`g_t` needs no client
  update), over every round :math:`1..T`; the correction needs the client updates of the
  rounds a forgotten client took part in only.
- :math:`S` is the ``sensitivity`` parameter, or by default the heuristic
  :math:`2 \\max_t p_t \\lVert r_t \\rVert_2` (twice the largest weighted residual), not the
  paper's bound. It is computed from the forgotten clients' own updates, so the noise scale
  itself depends on their data.
- **The (ε, δ) figure is nominal** unless its assumptions hold: the paper's
  indistinguishability from the retrained model needs :math:`S` to bound the distance
  between :math:`\\theta_T + \\sum_t p_t r_t` and the retrained model (under the paper's
  conditions), and :math:`\\varepsilon < 1` for the classical mechanism. The heuristic
  :math:`S` bounds nothing, and on a neural network the distance to retraining is not
  known; the result's notes say "nominal" whenever :math:`S` is derived, :math:`\\sigma` is
  set directly, or :math:`\\varepsilon \\ge 1`.
- Utility: the per-coordinate σ applies to all d parameters, so the noise's norm is
  :math:`\\sigma\\sqrt d`; with the heuristic :math:`S` and ε = 1 it dwarfs the correction
  on any model of thousands of parameters. Set ``sigma``, ``sensitivity`` or
  ``noise = false`` to study the two parts separately.
- The noise protects only while it is secret: with a known ``noise-seed`` anyone can
  regenerate and remove it. The default seed 0 is for reproducible research; use
  ``noise-seed = -1`` (fresh OS entropy) in deployment, and do not publish the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.unlearning.base import (
    MethodParams,
    TensorDict,
    Unlearner,
    UnlearningRequest,
    UnlearningResult,
    check_range,
    register,
)
from fedforget.unlearning.subtract import (
    check_contributions_retained,
    final_model,
    removal_residual,
)

WEIGHTS = ("paper", "unit")
"""The residual weightings: the paper's :math:`p_t`, or 1 for every round."""


@dataclass(frozen=True)
class FedRecoveryParams(MethodParams):
    """Parameters of :class:`FedRecovery`.

    Attributes
    ----------
    epsilon
        ε > 0 of the (ε, δ) target (the classical Gaussian-mechanism bound is proven for
        ε < 1).
    delta
        δ in (0, 1).
    sensitivity
        ℓ2 sensitivity S ≥ 0; 0 (default) derives :math:`2 \\max_t \\lVert r_t \\rVert_2`.
    noise_seed
        Seed of the noise; -1 draws fresh OS entropy (not reproducible).
    noise
        False leaves the noise out (the deterministic subtraction only).
    sigma
        σ ≥ 0 of the noise set directly; 0 (default) calibrates it from S, ε and δ.
    weights
        ``"paper"`` (default): :math:`p_t = \\lVert g_t \\rVert^2 / \\sum_j \\lVert g_j
        \\rVert^2`; ``"unit"``: :math:`p_t = 1` (every residual counts once).
    """

    epsilon: float = 1.0
    delta: float = 1e-5
    sensitivity: float = 0.0
    noise_seed: int = 0
    noise: bool = True
    sigma: float = 0.0
    weights: str = "paper"

    def validate(self) -> None:
        """Refuse out-of-range values with a ConfigError naming the parameter."""
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights = {self.weights!r} is not allowed; expected one of "
                              + ", ".join(repr(w) for w in WEIGHTS))
        check_range("sigma", self.sigma, low=0, high=math.inf, high_open=True)
        check_range("epsilon", self.epsilon, low=0, low_open=True)
        check_range("delta", self.delta, low=0, low_open=True, high=1, high_open=True)
        check_range("sensitivity", self.sensitivity, low=0)
        check_range("noise-seed", self.noise_seed, low=-1)


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """:math:`\\sigma = (S/\\varepsilon)\\sqrt{2\\ln(1.25/\\delta)}` (Gaussian mechanism)."""
    return sensitivity / epsilon * math.sqrt(2.0 * math.log(1.25 / delta))


def residual_norm(residual: TensorDict) -> float:
    """ℓ2 norm of a residual over all its tensors."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in residual.values()))


def step_weights(store: HistoryStore) -> dict[int, float]:
    """The paper's :math:`p_t = \\lVert g_t \\rVert^2 / \\sum_{j=1}^T \\lVert g_j \\rVert^2`,
    :math:`g_t = \\theta_t - \\theta_{t-1}` over the floating tensors, for every round
    :math:`t = 1..T` (all 0 when the model never moved)."""
    squares: dict[int, float] = {}
    before = store.global_model(0)
    for t in range(1, store.last_round + 1):
        after = store.global_model(t)
        squares[t] = sum(float(np.sum(np.square(after[k].astype(np.float64) - before[k])))
                         for k in after if after[k].dtype.kind == "f")
        before = after
    total = math.fsum(squares.values())
    return {t: (v / total if total > 0 else 0.0) for t, v in squares.items()}


@register
class FedRecovery(Unlearner[FedRecoveryParams]):
    """FedRecovery (Zhang et al., TIFS 2023): residual subtraction plus Gaussian noise.

    Server-only: no client work, cost zero client-epochs. Needs the stored updates of
    every round a forgotten client took part in (rounds without one have
    :math:`r_t = 0`). The forget set is cumulative, so the correction is applied to the
    history's :math:`\\theta_T` and ``request.current_model`` is not used. See the module
    docstring for the rule and for what is simplified.
    """

    name = "fedrecovery"
    version = "2"
    exact = False
    multi_client = True
    needs_clients = False
    Params = FedRecoveryParams


    def check(self, request: UnlearningRequest) -> None:
        """Refuse, before any work, what the history's retention cannot serve."""
        super().check(request)
        check_contributions_retained(request.store, request.forget, self.name)

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Subtract the residuals and add the noise."""
        store, forget = request.store, request.forget
        params = self.params
        rounds = check_contributions_retained(store, forget, self.name)
        base = final_model(store)
        if not rounds:
            return UnlearningResult(
                model=base,
                cost=request.federation.cost,
                rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to unlearn, no noise"],
            )
        theta = {k: v.astype(np.float64) for k, v in base.items() if v.dtype.kind == "f"}
        weights = (step_weights(store) if params.weights == "paper"
                   else dict.fromkeys(rounds, 1.0))
        largest = 0.0
        for t in rounds:
            residual = removal_residual(store, t, forget)
            largest = max(largest, weights[t] * residual_norm(residual))
            for k in theta:
                if k in residual:
                    theta[k] += weights[t] * residual[k]
        shown = ", ".join(f"{t}: {weights[t]:.4g}" for t in rounds)
        notes = [
            f"subtracted the residuals of rounds {rounds} weighted by "
            + ("p_t = |g_t|^2 / sum_j |g_j|^2 (" + shown + ")" if params.weights == "paper"
               else "p_t = 1")
            + f"; max weighted residual norm {largest:.6g}"
        ]
        if params.noise:
            sensitivity = params.sensitivity or 2.0 * largest
            sigma = params.sigma or gaussian_sigma(sensitivity, params.epsilon, params.delta)
            seed = None if params.noise_seed == -1 else params.noise_seed
            self.add_noise(theta, sigma, np.random.default_rng(seed))
            if params.sigma:
                notes.append(f"added N(0, sigma^2 I) noise, sigma = {sigma:.6g} (set "
                             "directly): no (epsilon, delta) figure is claimed")
            else:
                derived = "" if params.sensitivity else " (2 x max weighted residual norm)"
                why = []
                if not params.sensitivity:
                    why.append("the sensitivity is a heuristic, not a bound on the distance "
                               "to the retrained model")
                if params.epsilon >= 1:
                    why.append("the classical Gaussian-mechanism bound is proven for "
                               "epsilon < 1 only")
                label = ("nominal (" + "; ".join(why) + ")" if why else
                         "holds only if the sensitivity bounds the distance between the "
                         "corrected and the retrained model")
                notes.append(
                    f"added N(0, sigma^2 I) noise, sigma = {sigma:.6g} for epsilon = "
                    f"{params.epsilon}, delta = {params.delta}, sensitivity = "
                    f"{sensitivity:.6g}{derived}; the (epsilon, delta) figure is {label}"
                )
        else:
            notes.append("noise off: deterministic weighted residual subtraction only")
        model = {k: (theta[k].astype(v.dtype) if k in theta else v) for k, v in base.items()}
        request.report(store.last_round, model)  # the corrected model takes θ_T's place
        return UnlearningResult(
            model=model, cost=request.federation.cost, rounds_affected=rounds, notes=notes
        )

    @staticmethod
    def add_noise(theta: dict[str, np.ndarray], sigma: float, rng: np.random.Generator) -> None:
        """Add :math:`\\mathcal N(0, \\sigma^2)` to every entry, tensors in model order."""
        if sigma <= 0.0:
            return
        for k in theta:
            theta[k] += rng.normal(0.0, sigma, size=theta[k].shape)

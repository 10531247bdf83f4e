"""Fast-FedUL: remove the forgotten clients' skew from the final model, server-side.

Huynh, Nguyen, Nguyen, Nguyen, Weidlich, Nguyen and Aberer, "Fast-FedUL: A Training-Free
Federated Unlearning with Provable Skew Resilience", ECML PKDD 2024,
https://arxiv.org/abs/2405.18040; authors' code https://github.com/thanhtrunghuynh93/fastFedUL
(``algorithm/fast_fedUL.py``, ``compute_unlearn_term``).

The retrained trajectory :math:`\\theta^*_t` and the recorded one :math:`\\theta_t` differ by
the *skew* :math:`D_t = \\theta^*_t - \\theta_t`. One round moves it by the change of the
round's aggregate when the forgotten clients :math:`F` leave it, the removal residual

.. math::

    r_t = \\sum_{k \\in P_t \\setminus F} \\Big(\\frac{W_t\\, w_{t,k}}{\\sum_{j \\in P_t
        \\setminus F} w_{t,j}} - w_{t,k}\\Big) \\Delta_{t,k}
        - \\sum_{k \\in P_t \\cap F} w_{t,k} \\Delta_{t,k}

(:func:`fedforget.unlearning.subtract.removal_residual`; with :math:`N` equal clients, one
forgotten, it is the paper's :math:`\\frac{1}{N(N-1)} \\sum_{i \\ne u} \\Delta M^i_t -
\\frac1N \\Delta M^u_t`), and by how the remaining clients' training reacts to the skew
already there, which the paper bounds with a Lipschitz coefficient :math:`\\alpha` instead of
computing it. With the authors' code's rule (``rule = "code"``, the default)

.. math::

    D_0 = 0, \\qquad D_t = (1 - \\alpha\\, \\beta'_t)\\, D_{t-1} + r_t, \\qquad
    \\beta'_t = \\frac{\\sum_{k \\in P_t \\setminus F} w_{t,k}}{W_t},
    \\qquad \\tilde\\theta = \\theta_T + s\\, D_T,

where :math:`\\beta'_t` is the remaining clients' share of round :math:`t`'s aggregation
weight (the code's ``beta`` minus the target's weight) and :math:`s` the code's
``theta_delta`` (``scale``, 1). The remaining clients' gradient steps pull a skewed model
back towards their optimum, so the skew of early rounds decays. The supplement's
Algorithm 2 (``rule = "paper"``) writes the worst-case growth instead,
:math:`D_t = (1 + \\alpha) D_{t-1} + r_t`.

No client is asked for anything: the cost is zero client-epochs. Rounds without a forgotten
client add nothing (:math:`r_t = 0`) but still scale :math:`D`; only the rounds a forgotten
client took part in need stored updates.

Deviations from the paper and the authors' code:

- **Storage.** The authors keep, per round, only the ``expected_saving`` largest-norm updates
  (their "efficient client sampling"); here every update the history retained is used, which
  is their scheme with every update kept.
- **Aggregation.** The authors aggregate :math:`\\theta_{t} = \\theta_{t-1} + \\sum_{k \\in
  S_t} (n_k / n)\\, \\Delta_{t,k}` with :math:`n` the whole federation's data, not
  renormalised per round, so removing a client removes its term alone
  (:math:`r_t = -(n_u/n)\\Delta_{t,u}`) and :math:`\\beta'_t` is a share of all data. This
  history records FedAvg over the round's participants (weights sum to :math:`W_t`), so the
  residual includes the renormalisation of the others and :math:`\\beta'_t` is a share of
  the round's weight; the two coincide when every client takes part.
- **Rounds after the last contribution.** The code scales the skew only up to the target's
  last round (it computes the term in rounds where the target takes part); here it is scaled
  in every round up to :math:`T`, as the recursion says.
- **Several clients.** :math:`F` may hold several clients (the recursion is the same with
  the set's residual); the paper treats one target.
- The model in service is not used: the forget set is cumulative, so the correction is
  applied to the history's :math:`\\theta_T`, as for :mod:`subtract
  <fedforget.unlearning.subtract>` (which is this method with :math:`\\alpha = 0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.unlearning.base import (
    MethodParams,
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

RULES = ("code", "paper")
"""The skew recursions: the authors' code's contraction, or the supplement's growth."""


@dataclass(frozen=True)
class FastFedULParams(MethodParams):
    """Parameters of :class:`FastFedUL`.

    Attributes
    ----------
    lipschitz
        :math:`\\alpha \\ge 0`, the Lipschitz coefficient (the authors' ``alpha``: 0.07 in
        their script, 0.05 to 0.1 recommended).
    rule
        ``"code"``: :math:`1 - \\alpha\\beta'_t` (default); ``"paper"``: :math:`1 + \\alpha`.
    scale
        :math:`s`, the final factor of the correction (the authors' ``theta_delta``, 1).
    """

    lipschitz: float = 0.07
    rule: str = "code"
    scale: float = 1.0

    def validate(self) -> None:
        """Refuse out-of-range values with a ConfigError naming the parameter."""
        check_range("lipschitz", self.lipschitz, low=0, high=math.inf, high_open=True)
        if self.rule not in RULES:
            raise ConfigError(f"rule = {self.rule!r} is not allowed; expected one of "
                              + ", ".join(repr(r) for r in RULES))
        check_range("scale", self.scale, low=0, high=math.inf, high_open=True)


def skew_factor(store: HistoryStore, t: int, forget: frozenset[str], *, lipschitz: float,
                rule: str) -> float:
    """The factor of :math:`D_{t-1}` in round ``t``: :math:`1 - \\alpha\\beta'_t` or
    :math:`1 + \\alpha` (see the module docstring)."""
    if rule == "paper":
        return 1.0 + lipschitz
    participants = store.round(t).participants
    total = sum(p.weight for p in participants)
    remaining = sum(p.weight for p in participants if p.client_id not in forget)
    share = remaining / total if total > 0 else 0.0
    return 1.0 - lipschitz * share


@register
class FastFedUL(Unlearner[FastFedULParams]):
    """Fast-FedUL (Huynh et al., ECML PKDD 2024): the skew recursion, server-side only."""

    name = "fastfedul"
    exact = False
    multi_client = True
    needs_clients = False
    Params = FastFedULParams

    def check(self, request: UnlearningRequest) -> None:
        """Refuse, before any work, what the history's retention cannot serve."""
        super().check(request)
        check_contributions_retained(request.store, request.forget, self.name)

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """:math:`\\tilde\\theta = \\theta_T + s D_T`."""
        store, forget, params = request.store, request.forget, self.params
        rounds = check_contributions_retained(store, forget, self.name)
        base = final_model(store)
        if not rounds:
            return UnlearningResult(
                model=base, cost=request.federation.cost, rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to remove"])
        skew: dict[str, np.ndarray] = {k: np.zeros(v.shape, np.float64)
                                       for k, v in base.items() if v.dtype.kind == "f"}
        contributed = set(rounds)
        lowest = math.inf
        for t in range(rounds[0], store.last_round + 1):
            factor = skew_factor(store, t, forget, lipschitz=params.lipschitz, rule=params.rule)
            lowest = min(lowest, factor)
            for k in skew:
                skew[k] *= factor
            if t in contributed:
                residual = removal_residual(store, t, forget)
                for k in skew:
                    if k in residual:
                        skew[k] += residual[k]
        model = {k: ((v.astype(np.float64) + params.scale * skew[k]).astype(v.dtype)
                     if k in skew else v) for k, v in base.items()}
        request.report(store.last_round, model)  # the correction takes θ_T's place
        rule = ("1 - alpha * beta'_t (the authors' code)" if params.rule == "code"
                else "1 + alpha (the supplement's Algorithm 2)")
        notes = [f"skew recursion over rounds {rounds[0]}..{store.last_round} with factor "
                 f"{rule}, alpha = {params.lipschitz}, scale {params.scale}; residuals of "
                 f"rounds {rounds}"]
        if params.rule == "code" and lowest < 0:
            notes.append(f"alpha * beta' exceeded 1 (smallest factor {lowest:.4g}): the skew "
                         "changes sign between rounds; expected alpha <= 1")
        return UnlearningResult(model=model, cost=request.federation.cost,
                                rounds_affected=rounds, notes=notes)

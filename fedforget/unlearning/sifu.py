"""SIFU: roll back to the last round whose sensitivity bound holds, add noise, retrain.

Fraboni, Van Waerebeke, Scaman, Vidal, Kameni and Lorenzi, "Sequential Informed Federated
Unlearning: Efficient and Provable Client Unlearning in Federated Optimization", AISTATS
2024, https://arxiv.org/abs/2211.11656; authors' code
https://github.com/Accenture/Labs-Federated-Learning (branch ``SIFU``: ``FL/server.py``,
``FL/privacy.py``).

**The bound.** For the forgotten clients :math:`F` the server follows, round by round, a
bound :math:`\\Psi_t` on how far the global model would move had :math:`F` not taken part:

.. math::

    \\Psi_0 = 0, \\qquad
    \\Psi_t = \\kappa\\, \\Psi_{t-1} + \\frac{w_{t,F}}{1 - w_{t,F}}\\,
        \\Big\\lVert \\sum_{i \\in F \\cap P_t} \\frac{w_{t,i}}{w_{t,F}} \\Delta_{t,i}
        \\Big\\rVert_2, \\qquad w_{t,F} = \\frac{\\sum_{i \\in F \\cap P_t} w_{t,i}}{W_t}

(the second term only in rounds where a forgotten client took part;
:math:`\\kappa = (1 - \\eta\\lambda)^K`, the contraction of :math:`K` local steps with an
:math:`\\ell_2` regulariser :math:`\\lambda`, 1 without one). For one client :math:`i` this
is the authors' ``compute_metric``: :math:`\\frac{p_i}{1 - p_i} \\lVert \\theta - \\theta_{t,i}
\\rVert`.

**The rollback.** With the unlearning budget :math:`(\\varepsilon, \\delta)` and the noise
:math:`\\sigma`, the bound may grow to

.. math:: \\psi^* = \\frac{\\varepsilon\\, \\sigma}{\\sqrt{2 \\ln(1.25 / \\delta)}}

(the authors' ``psi``, :math:`\\delta = 1/M` for :math:`M` clients by default). SIFU restores
:math:`\\theta_{\\tilde T}`, :math:`\\tilde T = \\max\\{t \\le T : \\Psi_t \\le \\psi^*\\}`
(:math:`\\tilde T \\ge t_0 - 1`: the bound is 0 before the first contribution), perturbs it,

.. math:: \\hat\\theta_{\\tilde T} = \\theta_{\\tilde T} + \\mathcal N(0, \\sigma^2 I),

which by the Gaussian mechanism makes it :math:`(\\varepsilon, \\delta)`-indistinguishable
from the model a training without :math:`F` would have had at :math:`\\tilde T` *if*
:math:`\\Psi` bounds that distance (the paper proves it under its assumptions on the local
losses; on a neural network it is a calibration, not a proof, and the notes say so), and
retrains rounds :math:`\\tilde T + 1, \\dots, T` without :math:`F`.

Deviations from the paper and the authors' code:

- **Update norm.** :math:`\\Delta_{t,i} = \\theta_{t,i} - \\theta_{t-1}`, the stored update
  against the model the client received; the authors' code measures the local model
  against the global model after that round's aggregation.
- **Weights.** :math:`w_{t,F}` is the forgotten clients' share of round :math:`t`'s FedAvg
  weight (the weight that is renormalised away when they leave); the authors use a
  client's importance in the whole federation and a global learning rate.
- **Several clients** are bounded together through their weighted mean update (for one
  client, the authors' form); the authors handle sequences of requests with a tree of
  branches, here each request rolls back on the recorded history.
- **Retraining** runs :math:`T - \\tilde T` plain FedAvg rounds (weights by example counts)
  through :meth:`Federation.train` with the run's client sampling minus every excluded
  client, not recorded in a history; the authors retrain until a target accuracy or an
  iteration budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedforget.history import HistoryStore
from fedforget.unlearning.base import (
    MethodParams,
    RetentionError,
    TensorDict,
    Unlearner,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
    check_range,
    first_contribution,
    register,
    weighted_sum,
)


@dataclass(frozen=True)
class SIFUParams(MethodParams):
    """Parameters of :class:`SIFU` (defaults: the authors' example script).

    Attributes
    ----------
    epsilon
        :math:`\\varepsilon > 0` of the unlearning budget (10 in the authors' script).
    delta
        :math:`\\delta \\in (0, 1)`; 0 (default) takes :math:`1/M`, M the federation's clients.
    sigma
        :math:`\\sigma > 0`, the standard deviation of the noise (0.05 in their script).
    contraction
        :math:`\\kappa = (1 - \\eta\\lambda)^K \\in (0, 1]`; 1 without regularisation.
    retrain_rounds
        Rounds retrained after the rollback; 0 (default): :math:`T - \\tilde T`.
    noise_seed
        Seed of the noise; -1 draws fresh OS entropy (not reproducible).
    """

    epsilon: float = 10.0
    delta: float = 0.0
    sigma: float = 0.05
    contraction: float = 1.0
    retrain_rounds: int = 0
    noise_seed: int = 0

    def validate(self) -> None:
        """Refuse out-of-range values with a ConfigError naming the parameter."""
        check_range("epsilon", self.epsilon, low=0, low_open=True, high=math.inf,
                    high_open=True)
        check_range("delta", self.delta, low=0, high=1, high_open=True)
        check_range("sigma", self.sigma, low=0, low_open=True, high=math.inf, high_open=True)
        check_range("contraction", self.contraction, low=0, low_open=True, high=1)
        check_range("retrain-rounds", self.retrain_rounds, low=0)
        check_range("noise-seed", self.noise_seed, low=-1)


def psi_star(*, epsilon: float, sigma: float, delta: float) -> float:
    """:math:`\\psi^* = \\varepsilon\\sigma / \\sqrt{2\\ln(1.25/\\delta)}`."""
    return epsilon * sigma / math.sqrt(2.0 * math.log(1.25 / delta))


def _norm(tensors: TensorDict) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                         for v in tensors.values() if v.dtype.kind == "f"))


def sensitivity_bounds(store: HistoryStore, forget: frozenset[str], *,
                       contraction: float = 1.0) -> dict[int, float]:
    """:math:`\\Psi_t` for :math:`t = 0..T` (see the module docstring).

    Raises
    ------
    RetentionError
        A round a forgotten client took part in was not retained.
    """
    bounds = {0: 0.0}
    psi = 0.0
    for t in range(1, store.last_round + 1):
        psi *= contraction
        participants = store.round(t).participants
        mine = [p for p in participants if p.client_id in forget]
        if mine:
            if not store.is_retained(t):
                raise RetentionError(
                    f"sifu bounds the forgotten clients' influence from their stored updates, "
                    f"but round {t} was not retained (retain interval {store.retain_interval});"
                    " expected a history with retain-interval 1"
                )
            total = sum(p.weight for p in participants)
            share = sum(p.weight for p in mine) / total if total > 0 else 1.0
            if share >= 1.0:
                psi = math.inf
            else:
                mean = weighted_sum(
                    ((p.weight / sum(q.weight for q in mine),
                      store.client_update(t, p.client_id)) for p in mine),
                    store.client_update(t, mine[0].client_id))
                psi += share / (1.0 - share) * _norm(mean)
        bounds[t] = psi
    return bounds


@register
class SIFU(Unlearner[SIFUParams]):
    """SIFU (Fraboni et al., AISTATS 2024): certified rollback, noise, retraining."""

    name = "sifu"
    exact = False
    multi_client = True
    needs_clients = True
    Params = SIFUParams

    def check(self, request: UnlearningRequest) -> None:
        """Refuse a history whose retention cannot give the bound."""
        super().check(request)
        sensitivity_bounds(request.store, request.forget, contraction=self.params.contraction)

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Roll back to :math:`\\tilde T`, perturb, retrain :math:`\\tilde T+1..T`."""
        store, forget, federation = request.store, request.forget, request.federation
        params = self.params
        last = store.last_round
        t0 = first_contribution(store, forget)
        if t0 is None:
            return UnlearningResult(
                model=store.global_model(last), cost=federation.cost, rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to unlearn"])
        bounds = sensitivity_bounds(store, forget, contraction=params.contraction)
        clients = len(federation.roster) or len(store.roster())
        delta = params.delta or 1.0 / max(clients, 2)
        threshold = psi_star(epsilon=params.epsilon, sigma=params.sigma, delta=delta)
        rollback = max(t for t, psi in bounds.items() if psi <= threshold)
        theta = store.global_model(rollback)
        seed = None if params.noise_seed == -1 else params.noise_seed
        rng = np.random.default_rng(seed)
        model = {k: ((v.astype(np.float64) + rng.normal(0.0, params.sigma, v.shape))
                     .astype(v.dtype) if v.dtype.kind == "f" else v) for k, v in theta.items()}
        notes = [
            f"psi* = epsilon sigma / sqrt(2 ln(1.25/delta)) = {threshold:.6g} (epsilon = "
            f"{params.epsilon}, sigma = {params.sigma}, delta = {delta:.4g}); the bound "
            f"Psi_t stays within it up to round {rollback} (Psi_{rollback} = "
            f"{bounds[rollback]:.6g}" + (f", Psi_{rollback + 1} = {bounds[rollback + 1]:.6g}"
                                        if rollback < last else "") + ")",
            f"rolled back to the global model after round {rollback} and added "
            f"N(0, {params.sigma}^2 I) noise; the (epsilon, delta) figure is nominal on this "
            "model (the bound assumes the paper's conditions on the local losses)",
        ]
        if rollback == last:
            notes.append("the bound holds at round T: the noisy final model is the result")
            request.report(last, model)
            return UnlearningResult(model=model, cost=federation.cost,
                                    rounds_affected=[], notes=notes)
        rounds = params.retrain_rounds or (last - rollback)
        model = self._retrain(request, model, start=rollback + 1, rounds=rounds, notes=notes)
        return UnlearningResult(model=model, cost=federation.cost,
                                rounds_affected=list(range(t0, last + 1)), notes=notes)

    @staticmethod
    def _retrain(request: UnlearningRequest, model: TensorDict, *, start: int, rounds: int,
                 notes: list[str]) -> TensorDict:
        """FedAvg rounds ``start..start+rounds-1`` without the excluded clients."""
        from fedforget.unlearning.post_training import post_sampler

        store, federation = request.store, request.federation
        exclude = request.forget | request.exclude
        sampler = post_sampler(store, federation)
        for t in range(start, start + rounds):
            if sampler is not None:
                chosen = sampler.sample(t, federation.roster, exclude=exclude)
            else:
                chosen = [c for c in federation.roster if c not in exclude]
            if not chosen:
                raise UnlearningError(
                    f"sifu: no client left to retrain round {t} with (excluded "
                    f"{sorted(exclude)})")
            replies = federation.train(server_round=t, global_model=model, clients=chosen)
            used = [replies[c] for c in chosen if c in replies]
            if not used:
                notes.append(f"retraining round {t}: no client replied; the model is unchanged")
                continue
            total = sum(u.num_examples for u in used)
            model = weighted_sum(((u.num_examples / total, u.local_model) for u in used), model)
            request.report(t, model)
        notes.append(f"retrained rounds {start}..{start + rounds - 1} without "
                     f"{sorted(exclude)}")
        return model

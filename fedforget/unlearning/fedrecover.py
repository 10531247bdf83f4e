"""FedRecover: replay the rounds without the forgotten clients, estimating updates from history.

Cao, Jia, Zhang and Gong, "FedRecover: Recovering from Poisoning Attacks in Federated
Learning using Historical Information", IEEE S&P 2023, https://arxiv.org/abs/2210.10936.

The server replays rounds ``t0..T`` (``t0`` the forgotten clients' first round: the models
before it never saw them, so :math:`\\hat\\theta_{t_0-1} = \\theta_{t_0-1}`) with the
remaining participants of each recorded round. Instead of asking every client to train, it
estimates client :math:`k`'s update at the recovered model :math:`\\hat\\theta_{t-1}` from
the update :math:`\\bar g_{t,k}` it stored at the original model :math:`\\theta_{t-1}`
(Cauchy's mean value theorem, with an L-BFGS approximation :math:`\\tilde H_{t,k}` of the
integrated Hessian):

.. math::

    \\hat g_{t,k} = \\bar g_{t,k} + \\tilde H_{t,k}\\,(\\hat\\theta_{t-1} - \\theta_{t-1}),
    \\qquad
    \\hat\\theta_t = \\hat\\theta_{t-1} + \\sum_{k \\in P_t \\setminus F}
        \\frac{n_k}{\\sum_{j \\in P_t \\setminus F} n_j}\\,\\hat g_{t,k}

(FedAvg by example counts over the round's remaining participants). Updates are the stored
:math:`\\Delta_{t,k} = \\theta_{t,k} - \\theta_{t-1}`; the paper writes pseudo-gradients
:math:`g = -\\Delta`, and since the L-BFGS product is odd in the update differences
(:math:`B(S, -Y) = -B(S, Y)`) both conventions give the same estimate.

Exact updates are asked of the clients (``federation.train``, the only rounds that cost
client-epochs) in the paper's four cases:

* **warm-up**: the first ``warmup_rounds`` :math:`T_w` replayed rounds. The first of them
  is served from history: there :math:`\\hat\\theta_{t_0-1} = \\theta_{t_0-1}`, so each
  remaining client's exact update *is* its stored one (same model, same seed). It gives no
  curvature pair (:math:`\\Delta\\theta = 0`), which is why the paper asks :math:`T_w > s`;
* **periodic correction**: every ``correction_period`` :math:`T_c`-th round after the
  warm-up (0 turns it off);
* **abnormality fixing**: client :math:`k` alone, when an estimate has a coordinate larger
  than the abnormality threshold, :math:`\\lVert \\hat g_{t,k} \\rVert_\\infty > \\tau`.
  Unless set, :math:`\\tau` comes from the history with the tolerance rate
  :math:`\\alpha` (``tolerance_rate``): for each replayed round :math:`\\tau_t` is the
  smallest value that at most a fraction :math:`\\alpha` of the remaining clients' stored
  updates exceed in :math:`\\infty`-norm (``threshold_basis = "updates"``), and
  :math:`\\tau = \\max_t \\tau_t`. Read instead as a fraction of *coordinates*
  (``threshold_basis = "coordinates"``, this module's earlier reading), :math:`\\tau_t` is
  the :math:`(1-\\alpha)` quantile of the coordinates' magnitudes, which the largest
  coordinate of almost every update exceeds (a model of 4,810 parameters has about 48
  coordinates above its own 99th percentile): nearly every estimate is then "abnormal" and
  asked again, which is why the recovery cost 81% of retraining's client-epochs on the
  quick-start;
* **final tuning**: the last ``final_rounds`` :math:`T_f` rounds.

A client with no usable curvature pair yet (it skipped the warm-up rounds under client
sampling) is asked for its exact update too. Each exact update at a model that differs from
the original gives client :math:`k` a pair :math:`(\\Delta\\theta_t, \\Delta g_{t,k}) =
(\\hat\\theta_{t-1} - \\theta_{t-1},\\ g_{t,k} - \\bar g_{t,k})`; the last ``buffer_size``
:math:`s` pairs form the L-BFGS buffers. The paper refreshes the shared
:math:`\\Delta W` buffer only in rounds where all clients computed exact updates; here each
client keeps the :math:`\\Delta\\theta` of the rounds its own :math:`\\Delta g` came from, so
the pairs always match (the same thing when no abnormality fixing happens).

Paper defaults for runs of hundreds of rounds are :math:`T_w = 20, T_c = 10, T_f = 5, s = 2`;
the defaults here keep the paper's :math:`T_c = 10` and :math:`s = 2` and scale the warm-up and
the final tuning to runs of tens of rounds (``T_w = 3 > s = 2``, ``T_f = 2``).

**Cost, measured** (``simulations/quickstart.toml`` at 60 rounds and
``simulations/backdoor.toml``, 3 seeds): with the tolerance rate read over coordinates, 164
of 531 estimates per recovery were "abnormal" and asked again, and the recovery cost 59% of
retraining's client-epochs (81% at 30 rounds); read over updates, none is, and with
:math:`T_c = 10` the recovery costs 15% (60 rounds) and 18% (backdoor, 40 rounds) of
retraining's client-epochs at test accuracy within 0.2 points of retraining and backdoor
success within 0.3 points. Without periodic correction (:math:`T_c = 0`, 11% of the cost) the
backdoor comes back (21% success): the corrections, not the estimates, keep the replay on
the retrained trajectory.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedforget.errors import ConfigError
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
)

WARMUP = "warm-up"
CORRECTION = "correction"
FINAL = "final"

Vector = np.ndarray
_MAX_CONDITION = 1e10


@dataclass(frozen=True)
class FedRecoverParams(MethodParams):
    """FedRecover's parameters (paper names in brackets).

    Attributes
    ----------
    warmup_rounds : int
        :math:`T_w`, replayed rounds with exact updates at the start, ``>= 1``.
    correction_period : int
        :math:`T_c`, exact updates every :math:`T_c`-th round after the warm-up; 0: never.
    final_rounds : int
        :math:`T_f`, replayed rounds with exact updates at the end, ``>= 0``.
    buffer_size : int
        :math:`s`, curvature pairs kept per client for L-BFGS, ``>= 1``.
    abnormality_threshold : float
        :math:`\\tau`; an estimate with a larger coordinate is replaced by the exact update.
        0 derives it from the history with ``tolerance_rate``; ``inf`` turns it off.
    tolerance_rate : float
        :math:`\\alpha`, in [0, 1], used when ``abnormality_threshold`` is 0.
    threshold_basis : str
        What :math:`\\alpha` is a fraction of: ``"updates"`` (their :math:`\\infty`-norms)
        or ``"coordinates"`` (their entries' magnitudes).
    """

    warmup_rounds: int = 3
    correction_period: int = 10
    final_rounds: int = 2
    buffer_size: int = 2
    abnormality_threshold: float = 0.0
    tolerance_rate: float = 0.01
    threshold_basis: str = "updates"

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter out of range."""
        check_range("warmup-rounds", self.warmup_rounds, low=1)
        check_range("correction-period", self.correction_period, low=0)
        check_range("final-rounds", self.final_rounds, low=0)
        check_range("buffer-size", self.buffer_size, low=1)
        check_range("abnormality-threshold", self.abnormality_threshold, low=0)
        check_range("tolerance-rate", self.tolerance_rate, low=0, high=1)
        if self.threshold_basis not in BASES:
            raise ConfigError(f"threshold-basis = {self.threshold_basis!r} is not allowed; "
                              "expected one of " + ", ".join(repr(b) for b in BASES))


# ------------------------------------------------------------------------- schedule
def exact_schedule(
    first: int, last: int, *, warmup_rounds: int, correction_period: int, final_rounds: int
) -> dict[int, str]:
    """Rounds of ``first..last`` in which every remaining client's exact update is used.

    With :math:`i = t - \\text{first}` and :math:`n = \\text{last} - \\text{first} + 1`,
    round :math:`t` is warm-up if :math:`i < T_w`, final if :math:`i \\ge n - T_f`, and a
    correction if :math:`T_c > 0` and :math:`(i - T_w + 1) \\bmod T_c = 0` (so :math:`T_c - 1`
    estimated rounds precede each correction, and :math:`\\lfloor (n - T_w - T_f) / T_c
    \\rfloor` corrections happen, as in the paper's cost analysis).

    Returns
    -------
    dict[int, str]
        Round -> ``"warm-up"``, ``"correction"`` or ``"final"``; other rounds are estimated.
    """
    n = last - first + 1
    schedule: dict[int, str] = {}
    for t in range(first, last + 1):
        i = t - first
        if i < warmup_rounds:
            schedule[t] = WARMUP
        elif i >= n - final_rounds:
            schedule[t] = FINAL
        elif correction_period and (i - warmup_rounds + 1) % correction_period == 0:
            schedule[t] = CORRECTION
    return schedule


# -------------------------------------------------------------------------- L-BFGS
def lbfgs_hvp(dw: Sequence[Vector], dg: Sequence[Vector], v: Vector) -> Vector:
    """L-BFGS approximation of a Hessian-vector product :math:`\\tilde H v` (Algorithm 1).

    The compact representation of Byrd, Nocedal and Schnabel (1994) of the BFGS matrix
    built from the pairs :math:`S = [\\Delta w_1 \\dots \\Delta w_s]`,
    :math:`Y = [\\Delta g_1 \\dots \\Delta g_s]` (oldest first), with
    :math:`S^\\top Y = L + D + R` (:math:`L` strictly lower triangular, :math:`D` diagonal)
    and :math:`\\sigma = \\Delta g_s^\\top \\Delta w_s / \\Delta w_s^\\top \\Delta w_s`:

    .. math::

        \\tilde H v = \\sigma v - [\\sigma S \\;\\; Y]
        \\begin{bmatrix} \\sigma S^\\top S & L \\\\ L^\\top & -D \\end{bmatrix}^{-1}
        \\begin{bmatrix} \\sigma S^\\top v \\\\ Y^\\top v \\end{bmatrix}

    It satisfies the secant condition :math:`\\tilde H \\Delta w_s = \\Delta g_s`; with exact
    pairs :math:`\\Delta g_i = H \\Delta w_i` of a quadratic whose :math:`\\Delta w_i` are
    :math:`H`-conjugate it equals :math:`H v` on their span (and :math:`\\sigma v` on the
    orthogonal complement).

    Parameters
    ----------
    dw, dg
        The buffers, ``s >= 1`` vectors each, of the shape of ``v``.
    v
        The vector to multiply (``float64`` recommended).

    Raises
    ------
    ValueError
        On empty or mismatched buffers.
    numpy.linalg.LinAlgError
        When the middle matrix is singular or so ill-conditioned (condition number above
        1e10) that the solve would be noise, e.g. for (nearly) collinear :math:`\\Delta w_i`.
    """
    if not dw or len(dw) != len(dg):
        raise ValueError(f"L-BFGS needs s >= 1 pairs; got {len(dw)} Δw and {len(dg)} Δg")
    s_mat = np.stack(dw, axis=1)
    y_mat = np.stack(dg, axis=1)
    s = s_mat.shape[1]
    a = s_mat.T @ y_mat
    lower = np.tril(a, k=-1)
    d = np.diag(np.diag(a))
    last_w, last_g = s_mat[:, -1], y_mat[:, -1]
    sigma = float(last_g @ last_w) / float(last_w @ last_w)
    middle = np.block([[sigma * (s_mat.T @ s_mat), lower], [lower.T, -d]])
    rhs = np.concatenate([sigma * (s_mat.T @ v), y_mat.T @ v])
    if not np.all(np.isfinite(middle)) or np.linalg.cond(middle) > _MAX_CONDITION:
        raise np.linalg.LinAlgError(
            f"the L-BFGS system of {s} pairs is (nearly) singular: are the Δw collinear?"
        )
    p = np.linalg.solve(middle, rhs)
    result: Vector = sigma * v - sigma * (s_mat @ p[:s]) - y_mat @ p[s:]
    return result


BASES = ("updates", "coordinates")
"""What the tolerance rate is a fraction of."""


def abnormality_threshold(rounds: Iterable[Sequence[Vector]], tolerance_rate: float,
                          basis: str = "coordinates") -> float:
    """:math:`\\tau = \\max_t \\tau_t`, each :math:`\\tau_t` exceeded by at most a fraction
    :math:`\\alpha` of round :math:`t`'s values: the updates' :math:`\\infty`-norms
    (``basis = "updates"``) or their coordinates' magnitudes (``"coordinates"``).

    Parameters
    ----------
    rounds
        For each round, the stored updates of its remaining participants (flat vectors).
    tolerance_rate
        :math:`\\alpha \\in [0, 1]`; 0 gives the largest coordinate seen.
    basis
        ``"updates"`` or ``"coordinates"``.

    Returns
    -------
    float
        :math:`\\tau`, or ``inf`` when there are no updates.
    """
    tau = -math.inf
    for updates in rounds:
        if not updates:
            continue
        if basis == "updates":  # one value per update: its ∞-norm
            magnitudes = np.array([float(np.max(np.abs(u))) if np.size(u) else 0.0
                                   for u in updates])
        else:
            magnitudes = np.abs(np.concatenate([np.ravel(u) for u in updates]))
        # the j-th smallest (1-based) is exceeded by at most N - j values: j = ⌈N(1 - α)⌉
        j = max(math.ceil(magnitudes.size * (1.0 - tolerance_rate) - 1e-9), 1)
        tau = max(tau, float(np.partition(magnitudes, j - 1)[j - 1]))
    return tau if tau > -math.inf else math.inf


# ------------------------------------------------------------------------- helpers
def _flatten(tensors: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> Vector:
    if set(tensors) != set(like):
        raise UnlearningError(
            f"tensor dict has keys {sorted(tensors)}; expected the model's keys {sorted(like)}"
        )
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in like])


def _unflatten(vector: Vector, like: Mapping[str, np.ndarray]) -> TensorDict:
    out: TensorDict = {}
    offset = 0
    for name, value in like.items():
        size = int(np.size(value))
        chunk = vector[offset : offset + size].reshape(np.shape(value))
        out[name] = chunk.astype(np.float32 if value.dtype.kind == "f" else value.dtype)
        offset += size
    return out


class _Curvature:
    """One client's last ``size`` curvature pairs (Δθ, Δg), oldest first."""

    def __init__(self, size: int) -> None:
        self.pairs: deque[tuple[Vector, Vector]] = deque(maxlen=size)

    def add(self, dw: Vector, dg: Vector) -> None:
        if float(dw @ dw) > 0.0:  # Δθ = 0 carries no curvature (σ undefined)
            self.pairs.append((dw, dg))

    def estimate(self, stored: Vector, dw: Vector) -> Vector | None:
        """:math:`\\bar g + \\tilde H \\Delta\\theta`, or None without a usable buffer."""
        pairs = list(self.pairs)
        while pairs:  # on a singular system, retry with the most recent pairs only
            try:
                hv = lbfgs_hvp([p[0] for p in pairs], [p[1] for p in pairs], dw)
            except np.linalg.LinAlgError:
                pairs = pairs[1:]
                continue
            return stored + hv if bool(np.all(np.isfinite(hv))) else None
        return None


# -------------------------------------------------------------------------- method
@register
class FedRecover(Unlearner[FedRecoverParams]):
    """FedRecover (Cao et al., S&P 2023): history-estimated replay without the clients."""

    name = "fedrecover"
    Params = FedRecoverParams


    def check(self, request: UnlearningRequest) -> None:
        """Refuse a history whose retention dropped updates of a replayed round."""
        super().check(request)
        store = request.store
        t0 = first_contribution(store, request.forget)
        if t0 is None:
            return
        missing = [t for t in range(t0, store.last_round + 1) if not store.is_retained(t)]
        if missing:
            shown = ", ".join(str(t) for t in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise RetentionError(
                f"fedrecover replays rounds {t0}..{store.last_round} from the stored client "
                f"updates, but retain_interval {store.retain_interval} dropped those of "
                f"rounds {shown}; expected a history with retain_interval 1 from round {t0}"
            )

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Replay ``t0..T`` with estimated and exact updates (see the module docstring)."""
        store, forget, federation = request.store, request.forget, request.federation
        last = store.last_round
        t0 = first_contribution(store, forget)
        if t0 is None:
            model = (request.current_model if request.current_model is not None
                     else store.global_model(last))
            return UnlearningResult(
                model={k: np.asarray(v, dtype=np.float32) for k, v in model.items()},
                cost=federation.cost,
                rounds_affected=[],
                notes=[f"clients {sorted(forget)} never took part; the model is unchanged"],
            )
        like = store.global_model(t0 - 1)
        notes = [f"replayed rounds {t0}..{last} from θ_{t0 - 1} (rounds before {t0} are "
                 "unaffected)"]
        current = request.current_model
        if current is not None and any(
            k not in current or not np.array_equal(current[k], v)
            for k, v in store.global_model(last).items()
        ):
            notes.append("the model in service differs from the history's final model: "
                         "FedRecover recovers from the recorded history, so clients "
                         "forgotten by earlier requests must be listed in forget too")
        tau = self.params.abnormality_threshold or abnormality_threshold(
            self._stored_rounds(request, t0, like), self.params.tolerance_rate,
            self.params.threshold_basis,
        )
        notes.append(f"abnormality threshold τ = {tau:.6g}"
                     + ("" if self.params.abnormality_threshold else
                        f" (from the history, α = {self.params.tolerance_rate} of the "
                        f"{self.params.threshold_basis})"))
        schedule = exact_schedule(
            t0, last, warmup_rounds=self.params.warmup_rounds,
            correction_period=self.params.correction_period, final_rounds=self.params.final_rounds,
        )
        roster = set(federation.roster)
        buffers: dict[str, _Curvature] = {}
        counts = {"estimated": 0, "exact": 0, "abnormal": 0, "no-curvature": 0, "fallback": 0}
        theta_hat = _flatten(like, like)
        for t in range(t0, last + 1):
            record = store.round(t)
            remaining = [p for p in record.participants if p.client_id not in forget]
            if not remaining:
                continue
            theta_bar = _flatten(store.global_model(t - 1), like)
            dw = theta_hat - theta_bar
            stored = {p.client_id: _flatten(store.client_update(t, p.client_id), like)
                      for p in remaining}
            updates: dict[str, Vector] = {}
            ask: dict[str, str] = {}  # client -> reason its exact update is wanted
            if t == t0:
                updates = dict(stored)  # θ̂_{t0-1} = θ_{t0-1}: the stored updates are exact
            elif t in schedule:
                ask = {cid: schedule[t] for cid in stored}
            else:
                for cid, g_bar in stored.items():
                    curvature = buffers.setdefault(cid, _Curvature(self.params.buffer_size))
                    estimate = curvature.estimate(g_bar, dw)
                    if estimate is None:
                        ask[cid] = "no-curvature"
                    elif float(np.max(np.abs(estimate))) > tau:
                        ask[cid] = "abnormal"
                    else:
                        updates[cid] = estimate
                        counts["estimated"] += 1
            if ask:
                exact = self._exact_updates(request, t, theta_hat, like, sorted(ask), roster)
                for cid, reason in ask.items():
                    if reason in counts:
                        counts[reason] += 1
                    buffer = buffers.setdefault(cid, _Curvature(self.params.buffer_size))
                    if cid in exact:
                        updates[cid] = exact[cid]
                        buffer.add(dw, exact[cid] - stored[cid])
                        counts["exact"] += 1
                    else:  # no reply: a normal estimate if there is one, else the stored one
                        estimate = buffer.estimate(stored[cid], dw)
                        usable = estimate is not None and float(np.max(np.abs(estimate))) <= tau
                        updates[cid] = estimate if usable and estimate is not None else stored[cid]
                        counts["fallback"] += 1
            total = sum(p.num_examples for p in remaining)
            step = np.zeros_like(theta_hat)
            for p in remaining:  # FedAvg by example counts, in client-id order
                step += (p.num_examples / total) * updates[p.client_id]
            theta_hat = theta_hat + step
            if request.observe is not None:
                request.report(t, _unflatten(theta_hat, like))
        by_reason = {r: sum(1 for v in schedule.values() if v == r)
                     for r in (WARMUP, CORRECTION, FINAL)}
        notes.append(
            f"exact rounds: {by_reason[WARMUP]} warm-up (the first served from history), "
            f"{by_reason[CORRECTION]} correction, {by_reason[FINAL]} final; "
            f"{counts['exact']} exact and {counts['estimated']} estimated client updates; "
            f"{counts['abnormal']} abnormal and {counts['no-curvature']} without curvature "
            f"pairs asked again"
        )
        if counts["fallback"]:
            notes.append(f"{counts['fallback']} exact updates got no reply; the estimate (or "
                         "the stored update) was used instead")
        return UnlearningResult(
            model=_unflatten(theta_hat, like),
            cost=federation.cost,
            rounds_affected=list(range(t0, last + 1)),
            notes=notes,
        )

    # ------------------------------------------------------------------ stages
    @staticmethod
    def _stored_rounds(
        request: UnlearningRequest, t0: int, like: Mapping[str, np.ndarray]
    ) -> Iterable[list[Vector]]:
        """Per replayed round, the stored updates of its remaining participants."""
        store = request.store
        for t in range(t0, store.last_round + 1):
            yield [
                _flatten(store.client_update(t, p.client_id), like).astype(np.float32)
                for p in store.round(t).participants
                if p.client_id not in request.forget
            ]

    @staticmethod
    def _exact_updates(
        request: UnlearningRequest,
        t: int,
        theta_hat: Vector,
        like: Mapping[str, np.ndarray],
        clients: list[str],
        roster: set[str],
    ) -> dict[str, Vector]:
        """Ask ``clients`` (those still in the roster) to train from θ̂ in round ``t``."""
        reachable = [c for c in clients if c in roster]
        if not reachable:
            return {}
        replies = request.federation.train(
            server_round=t, global_model=_unflatten(theta_hat, like), clients=reachable,
            task="train",
        )
        return {
            cid: _flatten(reply.local_model, like) - theta_hat
            for cid, reply in replies.items()
            if cid in reachable
        }

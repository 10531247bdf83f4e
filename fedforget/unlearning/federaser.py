"""FedEraser: replay the retained rounds with calibrated client updates.

Liu et al., "FedEraser: Enabling Efficient Client-Level Data Removal from Federated
Learning Models", IWQoS 2021, https://arxiv.org/abs/2012.13891.

The server keeps the client updates :math:`U_{t,k} = \\theta_{t,k} - \\theta_{t-1}` of the
retained rounds :math:`1, 1 + \\Delta t, 1 + 2\\Delta t, \\dots` Let :math:`t_0` be the first
round in which a forgotten client took part, :math:`t_1 < t_2 < \\dots < t_m` the retained
rounds :math:`\\geq t_0`, and :math:`R_j` the participants of round :math:`t_j` minus the
forgotten clients. Starting from :math:`\\tilde\\theta = \\theta_{t_0 - 1}`, for each
:math:`t_j` the clients :math:`k \\in R_j` train :math:`E_{cal}` epochs from
:math:`\\tilde\\theta` (fresh update :math:`\\hat U_k`), and per layer (tensor) :math:`l`

.. math::

    \\tilde U^{l}_{k} = \\lVert U^{l}_{t_j,k} \\rVert
        \\frac{\\hat U^{l}_{k}}{\\lVert \\hat U^{l}_{k} \\rVert}, \\qquad
    \\tilde\\theta \\leftarrow \\tilde\\theta
        + \\frac{\\sum_{k \\in R_j} n_k \\tilde U_{k}}{\\sum_{k \\in R_j} n_k}

The unlearned model is :math:`\\tilde\\theta` after :math:`t_m`.
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
)


@dataclass(frozen=True)
class FedEraserParams(MethodParams):
    """Parameters of :class:`FedEraser` (paper names in brackets).

    Attributes
    ----------
    retain_interval
        Δt: replay rounds 1, 1 + Δt, 1 + 2Δt, ...; must be a multiple of the history's
        retain interval. 0 (default) uses the history's.
    calibration_ratio
        r in (0, 1]: calibration training runs r·E local epochs (paper default 0.5).
    local_epochs
        E, the local epochs of ordinary training; 0 (default) reads the run's
        ``local-epochs``.
    """

    retain_interval: int = 0
    calibration_ratio: float = 0.5
    local_epochs: int = 0

    def validate(self) -> None:
        """Refuse out-of-range values with a ConfigError naming the parameter."""
        check_range("retain-interval", self.retain_interval, low=0)
        check_range("calibration-ratio", self.calibration_ratio, low=0, low_open=True, high=1)
        check_range("local-epochs", self.local_epochs, low=0)


def calibration_epochs(calibration_ratio: float, local_epochs: int) -> int:
    """:math:`E_{cal} = \\max(1, \\lfloor r E + 1/2 \\rfloor)`.

    r·E is rounded half up (0.5·3 → 2, 0.5·5 → 3), which for the paper's r = 0.5 agrees
    with the authors' code (``ceil``); Python's ``round`` would round 2.5 to 2. At least one
    epoch is always run.
    """
    return max(1, math.floor(calibration_ratio * local_epochs + 0.5))


@dataclass(frozen=True)
class _Plan:
    t0: int | None  # first contribution of the forgotten clients
    rounds: tuple[int, ...]  # retained rounds replayed, ascending
    retain_interval: int
    local_epochs: int
    calibration_epochs: int


@register
class FedEraser(Unlearner[FedEraserParams]):
    """FedEraser (Liu et al., IWQoS 2021): calibrated replay of the retained rounds.

    Choices where the paper leaves room:

    - **Start.** Rounds before :math:`t_0` never saw the forgotten clients, so the replay
      starts from :math:`\\theta_{t_0-1}` (stored every round) rather than from
      :math:`\\theta_0`; with :math:`t_0 = 1`, as in the paper, the two agree.
    - **First round.** The paper updates the model in the first reconstruction round
      with the retained updates directly, without calibration, because the initial model
      holds no trace of the forgotten client. The same holds whenever the first replayed
      round is :math:`t_0` itself: its stored updates were computed from
      :math:`\\theta_{t_0-1}`, the replay's start, so they are used as they are (renormalised
      over :math:`R_j`) and no client trains. When :math:`t_0` is not a retained round,
      every replayed round is calibrated.
    - **Norm.** :math:`\\lVert U_{t_j,k} \\rVert` is that of the stored update of the same
      round, measured against :math:`\\theta_{t_j-1}`, the model sent in round
      :math:`t_j`, as the paper writes. The authors' released code measures it against the
      next round's global model, which shrinks every step by an order of magnitude.
    - **Weights.** Example counts :math:`n_k` as recorded in the history, summed over the
      clients that replied (the paper's extra :math:`1/(K-1)` factor is not applied).
    - **Zero fresh update.** If :math:`\\lVert \\hat U^{l}_k \\rVert = 0` for a tensor, its
      calibrated update is 0 (there is no direction to scale).
    - **Epochs.** :math:`E_{cal} = \\max(1, \\lfloor rE + 1/2 \\rfloor)`, see
      :func:`calibration_epochs`.

    Non-floating tensors (counters) keep the values of :math:`\\theta_{t_0-1}`. Sums are
    accumulated in float64 and the model is returned in the global model's dtypes. The
    model in service (``request.current_model``) is not used: the method rebuilds from the
    history, and the forget set is cumulative (every client withdrawn so far).
    """

    name = "federaser"
    exact = False
    multi_client = True
    needs_clients = True
    Params = FedEraserParams


    # ------------------------------------------------------------------ planning
    def _plan(self, store: HistoryStore, forget: frozenset[str]) -> _Plan:
        """Work out the rounds to replay; raise what cannot be served."""
        params = self.params
        last = store.last_round
        kept = store.retain_interval
        interval = params.retain_interval or kept
        if interval % kept != 0:
            needed = [t for t in range(1, last + 1) if (t - 1) % interval == 0]
            missing = [t for t in needed if not store.is_retained(t)]
            detail = f"; rounds {missing} would be needed but were not retained" if missing else ""
            raise RetentionError(
                f"federaser: retain-interval = {interval} is not a multiple of the history's "
                f"retain interval {kept} (it keeps rounds 1, {1 + kept}, {1 + 2 * kept}, ...)"
                f"{detail}; expected a multiple of {kept}, or 0 to use the history's"
            )
        epochs = params.local_epochs or _run_local_epochs(store)
        cal = calibration_epochs(params.calibration_ratio, epochs)
        t0 = first_contribution(store, forget)
        if t0 is None:
            return _Plan(None, (), interval, epochs, cal)
        rounds = tuple(t for t in range(t0, last + 1) if (t - 1) % interval == 0)
        missing = [
            t
            for t in rounds
            if any(
                not p.retained for p in store.round(t).participants if p.client_id not in forget
            )
        ]
        if missing:
            raise RetentionError(
                f"federaser needs the stored client updates of rounds {list(rounds)}; the "
                f"history (retain interval {kept}) did not keep them for rounds {missing}"
            )
        return _Plan(t0, rounds, interval, epochs, cal)

    def check(self, request: UnlearningRequest) -> None:
        """Refuse, before any work, a request the history's retention cannot serve."""
        super().check(request)
        self._plan(request.store, request.forget)

    # ------------------------------------------------------------------ running
    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Replay the retained rounds from :math:`\\theta_{t_0-1}` with calibrated updates."""
        store, forget, federation = request.store, request.forget, request.federation
        plan = self._plan(store, forget)
        if plan.t0 is None:
            return UnlearningResult(
                model=store.global_model(store.last_round),
                cost=federation.cost,
                rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to unlearn"],
            )

        start = store.global_model(plan.t0 - 1)
        floating = [k for k, v in start.items() if v.dtype.kind == "f"]
        theta = {k: start[k].astype(np.float64) for k in floating}
        notes = [
            f"started from the global model after round {plan.t0 - 1}; replayed retained "
            f"rounds {list(plan.rounds)} (retain interval {plan.retain_interval}) with "
            f"{plan.calibration_epochs} calibration epoch(s) = max(1, round("
            f"{self.params.calibration_ratio} x {plan.local_epochs}))"
        ]
        roster = set(federation.roster)
        for j, t in enumerate(plan.rounds):
            record = store.round(t)
            remaining = [p for p in record.participants if p.client_id not in forget]
            if not remaining:
                notes.append(f"round {t}: only forgotten clients took part; skipped")
                continue
            if j == 0 and t == plan.t0:
                # The stored updates were computed from θ_{t0-1}, the replay's start.
                total = sum(p.num_examples for p in remaining)
                _require_examples(total, t)
                for p in remaining:
                    update = store.client_update(t, p.client_id)
                    for k in floating:
                        theta[k] += (p.num_examples / total) * update[k].astype(np.float64)
                notes.append(f"round {t}: stored updates applied without calibration")
                if request.observe is not None:
                    request.report(t, _as_model(theta, start))
                continue

            absent = [p.client_id for p in remaining if p.client_id not in roster]
            if absent:
                notes.append(f"round {t}: clients {absent} are not in the federation; left out")
            sent = _as_model(theta, start)
            replies = federation.train(
                server_round=t,
                global_model=sent,
                clients=[p.client_id for p in remaining if p.client_id in roster],
                local_epochs=plan.calibration_epochs,
            )
            used = [p for p in remaining if p.client_id in replies]
            if not used:
                raise UnlearningError(
                    f"federaser: no remaining client of round {t} replied to calibration "
                    f"training (asked {[p.client_id for p in remaining if p.client_id in roster]})"
                )
            if len(used) < len(remaining):
                missed = sorted({p.client_id for p in remaining} - {p.client_id for p in used})
                notes.append(f"round {t}: no calibration reply from {missed}; aggregated the rest")
            total = sum(p.num_examples for p in used)
            _require_examples(total, t)
            step = {k: np.zeros_like(theta[k]) for k in floating}
            for p in used:
                stored = store.client_update(t, p.client_id)
                local = replies[p.client_id].local_model
                for k in floating:
                    fresh = local[k].astype(np.float64) - sent[k].astype(np.float64)
                    step[k] += (p.num_examples / total) * calibrate(stored[k], fresh)
            for k in floating:
                theta[k] += step[k]
            if request.observe is not None:
                request.report(t, _as_model(theta, start))

        return UnlearningResult(
            model=_as_model(theta, start),
            cost=federation.cost,
            rounds_affected=list(range(plan.t0, store.last_round + 1)),
            notes=notes,
        )


def calibrate(stored: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """:math:`\\lVert U \\rVert \\hat U / \\lVert \\hat U \\rVert` for one tensor, in float64.

    Returns zeros when the fresh update is zero (no direction to scale).
    """
    fresh = np.asarray(fresh, dtype=np.float64)
    fresh_norm = float(np.linalg.norm(fresh.ravel()))
    if fresh_norm == 0.0:
        return np.zeros_like(fresh)
    stored_norm = float(np.linalg.norm(np.asarray(stored, dtype=np.float64).ravel()))
    return (stored_norm / fresh_norm) * fresh


def _as_model(theta: dict[str, np.ndarray], like: TensorDict) -> TensorDict:
    """``like``'s keys, order and dtypes, floating tensors taken from ``theta``."""
    return {
        k: (theta[k].astype(v.dtype) if k in theta else np.array(v, copy=True))
        for k, v in like.items()
    }


def _require_examples(total: int, t: int) -> None:
    if total <= 0:
        raise UnlearningError(
            f"federaser: the remaining clients of round {t} report {total} examples in all; "
            "expected a positive count to weight their updates"
        )


def _run_local_epochs(store: HistoryStore) -> int:
    """The run's ``local-epochs`` (E) from the history's run config."""
    value = store.run_config.get("local-epochs")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnlearningError(
            f"federaser: the run config records local-epochs = {value!r}; expected an "
            "integer >= 1 (or set the method's local-epochs)"
        )
    return value

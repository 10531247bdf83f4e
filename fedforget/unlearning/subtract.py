"""Subtraction: remove the forgotten clients' stored contributions, server-side.

FedAccum-style (the uncalibrated baseline of Liu et al., IWQoS 2021,
https://arxiv.org/abs/2012.13891). Under FedAvg the final model is the sum of the
aggregated updates, :math:`\\theta_T = \\theta_0 + \\sum_t \\sum_k w_{t,k} \\Delta_{t,k}`. Take
the forgotten clients :math:`F` out of every round and renormalise the remaining weights:

.. math::

    \\tilde\\theta = \\theta_0 + \\sum_{t=1}^{T} \\sum_{k \\notin F}
        \\frac{W_t\\, w_{t,k}}{\\sum_{j \\notin F} w_{t,j}} \\Delta_{t,k},
    \\qquad W_t = \\sum_k w_{t,k}

(:math:`w_{t,k} = n_k / \\sum_j n_j` under FedAvg, so the weights become
:math:`n_k / \\sum_{j \\notin F} n_j`). Rounds without a forgotten client contribute what they
contributed before, so the same model is reached from the final one through the
per-round residuals of the rounds :math:`P_F` in which a forgotten client took part:

.. math::

    \\tilde\\theta = \\theta_T + \\sum_{t \\in P_F} r_t, \\qquad
    r_t = \\sum_{k \\notin F} \\Big(\\frac{W_t\\, w_{t,k}}{\\sum_{j \\notin F} w_{t,j}}
        - w_{t,k}\\Big) \\Delta_{t,k} - \\sum_{k \\in F} w_{t,k} \\Delta_{t,k}

which is what is computed: only the rounds in :math:`P_F` need stored updates, and the
untouched rounds keep their exact fp32 sum. A round in which only forgotten clients took
part contributes nothing (:math:`r_t = -\\sum_k w_{t,k}\\Delta_{t,k}`).

This is an approximation of retraining: every update after the forgotten clients' first
contribution was computed from a model that held their influence, and stays as it was.
An optional repair runs ordinary rounds with the remaining clients afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    register,
)


@dataclass(frozen=True)
class SubtractParams(MethodParams):
    """Parameters of :class:`Subtract`.

    Attributes
    ----------
    repair_rounds
        Ordinary rounds with the remaining clients after the subtraction (0: none, no
        client work).
    repair_epochs
        Local epochs of each repair round; 0 (default) reads the run's ``local-epochs``.
    """

    repair_rounds: int = 0
    repair_epochs: int = 0

    def validate(self) -> None:
        """Refuse out-of-range values with a ConfigError naming the parameter."""
        check_range("repair-rounds", self.repair_rounds, low=0)
        check_range("repair-epochs", self.repair_epochs, low=0)


# --------------------------------------------------------------- shared helpers
def contributed_rounds(store: HistoryStore, clients: Iterable[str]) -> list[int]:
    """:math:`P_F`: the rounds in which any of ``clients`` took part, ascending."""
    rounds = store.clients()
    return sorted({t for c in clients for t in rounds.get(c, [])})


def check_contributions_retained(
    store: HistoryStore, forget: frozenset[str], method: str
) -> list[int]:
    """Return :math:`P_F`; raise RetentionError if any of its updates was not kept."""
    needed = contributed_rounds(store, forget)
    missing = [
        t for t in needed if any(not p.retained for p in store.round(t).participants)
    ]
    if missing:
        kept = store.retain_interval
        raise RetentionError(
            f"{method} needs the stored client updates of every round a forgotten client "
            f"took part in ({needed}); the history keeps them only every {kept} rounds "
            f"(1, {1 + kept}, {1 + 2 * kept}, ...), so rounds {missing} are missing; record "
            "with retain-interval 1, or use an exact method (retrain, rollback)"
        )
    return needed


def removal_residual(store: HistoryStore, t: int, forget: frozenset[str]) -> TensorDict:
    """:math:`r_t`, the change to round ``t``'s aggregated update when ``forget`` leaves it.

    .. math::

        r_t = \\sum_{k \\notin F} \\Big(\\frac{W_t\\, w_{t,k}}{\\sum_{j \\notin F} w_{t,j}}
            - w_{t,k}\\Big) \\Delta_{t,k} - \\sum_{k \\in F} w_{t,k} \\Delta_{t,k}

    Floating tensors only, in float64, in the stored updates' key order; zero when no
    forgotten client took part.
    """
    participants = store.round(t).participants
    total = sum(p.weight for p in participants)
    remaining = sum(p.weight for p in participants if p.client_id not in forget)
    acc: dict[str, np.ndarray] | None = None
    for p in participants:
        if p.client_id in forget:
            coef = -p.weight
        elif remaining > 0:
            coef = p.weight * total / remaining - p.weight
        else:  # remaining clients of weight zero contributed nothing and still do not
            coef = 0.0
        if coef == 0.0 and acc is not None:
            continue
        update = store.client_update(t, p.client_id)
        if acc is None:
            acc = _zeros_like_floating(update)
        for k in acc:
            acc[k] += coef * update[k].astype(np.float64)
    return acc if acc is not None else {}


def _zeros_like_floating(tensors: TensorDict) -> dict[str, np.ndarray]:
    """float64 zeros shaped like the floating tensors of ``tensors``."""
    return {k: np.zeros(v.shape, np.float64) for k, v in tensors.items() if v.dtype.kind == "f"}


def final_model(store: HistoryStore) -> TensorDict:
    """:math:`\\theta_T`, the global model after the last round (the history's initial model
    when no round was committed)."""
    return store.global_model(store.last_round)


def apply_residuals(base: TensorDict, residuals: Iterable[tuple[float, TensorDict]]) -> TensorDict:
    """:math:`\\theta + \\sum \\lambda r` in float64, returned in ``base``'s dtypes and order."""
    acc = {k: v.astype(np.float64) for k, v in base.items() if v.dtype.kind == "f"}
    for weight, residual in residuals:
        for k in acc:
            if k in residual:
                acc[k] += weight * residual[k]
    return {k: (acc[k].astype(v.dtype) if k in acc else v) for k, v in base.items()}


def run_local_epochs(store: HistoryStore, method: str) -> int:
    """The run's ``local-epochs`` (E) from the history's run config."""
    value = store.run_config.get("local-epochs")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnlearningError(
            f"{method}: the run config records local-epochs = {value!r}; expected an "
            "integer >= 1"
        )
    return value


# ------------------------------------------------------------------------ method
@register
class Subtract(Unlearner[SubtractParams]):
    """Remove the forgotten clients' weighted contributions from the model, server-side.

    :math:`\\tilde\\theta = \\theta_T + \\sum_{t \\in P_F} r_t` (see the module docstring).
    Needs the stored updates of every round a forgotten client took part in; rounds
    without one need nothing, so a retain interval above 1 is served when the forgotten
    clients only took part in retained rounds. Equal to the removal from
    :math:`\\theta_0` written in the module docstring when the global models are the
    recorded weighted sums (FedAvg, FedProx) and updates are stored in fp32 (checked on a
    recorded Flower run to float32 precision).

    The forget set is cumulative (every client withdrawn so far), so the model is rebuilt
    from the history's :math:`\\theta_T`; ``request.current_model`` is not used (applying
    the residuals to it would subtract earlier withdrawals twice).

    Repair (``repair_rounds`` > 0): rounds :math:`T+1, \\dots, T+R` in which the
    federation's clients minus :math:`F` train from :math:`\\tilde\\theta` and
    :math:`\\tilde\\theta \\leftarrow \\sum_k n_k \\theta_k / \\sum_k n_k`. These are
    plain requests through :meth:`Federation.train`, not recorded in the history.
    """

    name = "subtract"
    exact = False
    multi_client = True
    needs_clients = False  # true only with repair-rounds > 0 (see uses_clients)
    Params = SubtractParams

    def uses_clients(self) -> bool:
        """Only the repair rounds ask the clients for work."""
        return self.params.repair_rounds > 0


    def check(self, request: UnlearningRequest) -> None:
        """Refuse, before any work, what the history's retention cannot serve."""
        super().check(request)
        check_contributions_retained(request.store, request.forget, self.name)
        params = self.params
        if params.repair_rounds > 0:
            if getattr(request, "federation", None) is None:
                raise UnlearningError(
                    f"subtract with repair-rounds = {params.repair_rounds} needs the "
                    "federation; none was given"
                )
            if params.repair_epochs == 0:
                run_local_epochs(request.store, self.name)

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Subtract the residuals, then repair if asked."""
        store, forget = request.store, request.forget
        params = self.params
        rounds = check_contributions_retained(store, forget, self.name)
        base = final_model(store)
        if not rounds:
            return UnlearningResult(
                model=base,
                cost=request.federation.cost,
                rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to subtract"],
            )
        model = apply_residuals(base, ((1.0, removal_residual(store, t, forget)) for t in rounds))
        request.report(store.last_round, model)  # the subtraction takes θ_T's place
        notes = [
            f"subtracted the contributions of rounds {rounds} from the global model after "
            f"round {store.last_round}"
        ]
        if params.repair_rounds > 0:
            model = self._repair(request, model, notes)
        return UnlearningResult(
            model=model, cost=request.federation.cost, rounds_affected=rounds, notes=notes
        )

    def _repair(
        self, request: UnlearningRequest, model: TensorDict, notes: list[str]
    ) -> TensorDict:
        """``repair_rounds`` ordinary FedAvg rounds of the remaining clients."""
        params = self.params
        store, federation = request.store, request.federation
        epochs = params.repair_epochs or run_local_epochs(store, self.name)
        clients = [c for c in federation.roster if c not in request.forget]
        if not clients:
            raise UnlearningError("subtract: no remaining client in the federation to repair with")
        last = store.last_round
        for i in range(1, params.repair_rounds + 1):
            replies = federation.train(
                server_round=last + i, global_model=model, clients=clients, local_epochs=epochs
            )
            total = sum(replies[c].num_examples for c in sorted(replies))
            if not replies or total <= 0:
                raise UnlearningError(
                    f"subtract: repair round {last + i} got no usable reply from {clients}"
                )
            acc = _zeros_like_floating(model)
            for c in sorted(replies):
                reply = replies[c]
                for k in acc:
                    acc[k] += (reply.num_examples / total) * reply.local_model[k].astype(np.float64)
            model = {k: (acc[k].astype(v.dtype) if k in acc else v) for k, v in model.items()}
            request.report(last + i, model)
        notes.append(
            f"repaired with {params.repair_rounds} round(s) of {epochs} epoch(s) "
            f"(rounds {last + 1}..{last + params.repair_rounds}) by {clients}"
        )
        return model

r"""Repair: an approximate method, then a few rounds weighted toward the clients it hurt.

An approximate unlearning method can hurt the remaining clients whose data resemble the
forgotten data more than the others (:mod:`fedforget.evaluation.collateral`). ``repair``
runs any approximate method (``base``, with ``base-params``) and then limits that harm:

1. every remaining client evaluates the model before and after the base method on its own
   held-out data (the profile task, :mod:`fedforget.evaluation.profile`): harm
   :math:`h_k = a_k - b_k`;
2. the hurt group :math:`H` is the clients whose harm is significantly larger than the
   rest's (Holm-corrected, as in the collateral figures); when the test names nobody,
   :math:`H` is the clients whose harm is above the mean harm;
3. ``rounds`` rounds of federated training over all remaining clients, from the base
   method's model, aggregated with weights

   .. math:: p_k \propto n_k \,(1 + \beta\, \mathbb 1[k \in H]),

   :math:`\beta` = ``boost`` (the clients still leave out every record and class in force).

This is a targeted form of fair re-weighting — the agnostic / q-fair federated learning
idea (Mohri et al., ICML 2019; Li et al., ICLR 2020) of putting more weight on the clients
the model serves worst — restricted to the clients the unlearning hurt; it is fedforget's
own step, not a method from one paper. Its cost (the evaluations and the rounds) is part of
the result's cost and stated in its notes, so that it can be weighed against no repair (the
base method's own result).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedforget.errors import ConfigError, FedForgetError
from fedforget.unlearning.base import (
    ClientUpdate,
    MethodParams,
    TensorDict,
    Unlearner,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
    check_range,
    get_method,
    register,
    weighted_sum,
)


@dataclass(frozen=True)
class RepairParams(MethodParams):
    """Repair's parameters.

    Attributes
    ----------
    base : str
        The approximate method to run first.
    base_params : dict
        Its parameters.
    rounds : int
        Repair rounds, ``>= 1``.
    boost : float
        :math:`\\beta \\ge 0`, the extra weight of the hurt group.
    epochs : int
        Local epochs in the repair rounds; 0: the run's.
    """

    base: str = "pga"
    base_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 2
    boost: float = 3.0
    epochs: int = 0

    def validate(self) -> None:
        """Refuse an unknown or exact base method, bad base parameters, values out of
        range."""
        check_range("rounds", self.rounds, low=1)
        check_range("boost", self.boost, low=0, high=math.inf, high_open=True)
        check_range("epochs", self.epochs, low=0)
        if not isinstance(self.base_params, dict):
            raise ConfigError(f"base-params = {self.base_params!r}: expected a table of the "
                              "base method's parameters")
        if self.base == "repair":
            raise ConfigError("base = 'repair': expected an unlearning method to repair")
        try:
            inner = get_method(self.base, self.base_params)
        except FedForgetError as exc:
            raise ConfigError(f"base = {self.base!r}: {exc}") from None
        if inner.exact:
            raise ConfigError(f"base = {self.base!r} is exact: there is nothing to repair; "
                              "expected an approximate method")


def boosted_average(updates: Sequence[ClientUpdate], hurt: Collection[str], boost: float, *,
                    like: Mapping[str, np.ndarray]) -> TensorDict:
    r""":math:`\sum_k p_k \theta_k` with :math:`p_k \propto n_k (1 + \beta\,
    \mathbb 1[k \in H])`, accumulated in float64, in ``like``'s dtypes."""
    raw = [u.num_examples * (1 + boost * (u.client_id in hurt)) for u in updates]
    total = float(sum(raw))
    return weighted_sum(((w / total, u.local_model) for w, u in zip(raw, updates, strict=True)),
                        like)


def _model_bytes(model: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in model.values()))


@register
class Repair(Unlearner[RepairParams]):
    """Run an approximate method, then rounds weighted toward the clients it hurt."""

    name = "repair"
    request_kinds = ("client", "records", "class")
    Params = RepairParams

    def __init__(self, params: RepairParams | None = None) -> None:
        super().__init__(params)
        self.base = get_method(self.params.base, self.params.base_params)
        self.multi_client = self.base.multi_client  # type: ignore[misc]

    def uses_clients(self) -> bool:  # noqa: D102
        return True

    def check(self, request: UnlearningRequest) -> None:
        """The base method's checks."""
        self.base.check(request)

    def run(self, request: UnlearningRequest) -> UnlearningResult:  # noqa: D102
        from fedforget.evaluation.collateral import ClientProfile, collateral_report
        from fedforget.evaluation.profile import ask_profiles
        from fedforget.withdrawal import WithdrawalLedger

        store, federation = request.store, request.federation
        result = self.base.unlearn(request)
        base_cost = dataclasses.replace(federation.cost)  # a copy: train() adds in place
        before = (request.current_model if request.current_model is not None
                  else store.global_model(store.last_round))
        with WithdrawalLedger(store.directory) as ledger:
            withdrawn = ledger.withdrawn()
        remaining = [c for c in federation.roster
                     if c not in request.forget and c not in withdrawn]
        a = ask_profiles(federation, before, remaining, None)
        b = ask_profiles(federation, result.model, remaining, None)
        size = _model_bytes(result.model)
        federation.cost.bytes_sent += (len(remaining) * 2) * size
        federation.cost.bytes_received += (len(a) + len(b)) * size
        profiles = [ClientProfile(c, a[c]["accuracy"], b[c]["accuracy"],
                                  int(a[c].get("profile-examples", 0)))
                    for c in remaining if "accuracy" in a.get(c, {})
                    and "accuracy" in b.get(c, {})]
        hurt: list[str] = []
        how = "no client evaluation: no group to favour"
        if profiles:
            report = collateral_report(profiles)
            hurt = list(report.hurt)
            how = "significantly hurt (Holm)"
            if not hurt:
                mean = sum(p.harm for p in profiles) / len(profiles)
                hurt = [p.client_id for p in profiles if p.harm > mean]
                how = "hurt more than the mean (no client significantly)"
        model = result.model
        last = store.last_round
        for i in range(self.params.rounds):
            updates = federation.train(server_round=last + 1 + i, global_model=model,
                                       clients=remaining,
                                       local_epochs=self.params.epochs or None)
            replied = [updates[c] for c in remaining if c in updates]
            if not replied:
                raise UnlearningError(f"repair round {i + 1}: no client replied")
            model = boosted_average(replied, hurt, self.params.boost, like=model)
            request.report(last + 1 + i, model)
        cost = federation.cost
        extra = cost.client_epochs - base_cost.client_epochs
        notes = list(result.notes) + [
            f"repair after {self.base.name}: favoured {', '.join(hurt) or 'nobody'} ({how}) "
            f"with weight ×{1 + self.params.boost:g} in {self.params.rounds} rounds over "
            f"{len(remaining)} clients; repair cost {extra:g}"
            f" client-epochs and {cost.rounds - base_cost.rounds} rounds, of "
            f"{cost.client_epochs:g} and {cost.rounds} in all",
        ]
        return UnlearningResult(model=model, cost=cost, rounds_affected=result.rounds_affected,
                                notes=notes)

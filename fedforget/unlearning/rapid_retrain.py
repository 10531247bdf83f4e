r"""Rapid retraining: record-level federated unlearning by a Newton-type retraining.

Liu, Xu, Yuan, Wang and Li, "The Right to be Forgotten in Federated Learning: An Efficient
Realization with Rapid Retraining", IEEE INFOCOM 2022,
https://doi.org/10.1109/INFOCOM48880.2022.9796721 (arXiv:2203.07320).

Why this method for records. It is made for the request this module serves: clients
delete *some samples* and stay, and the federation retrains on the remaining data without
the server ever seeing it; it needs no stored history (so it works whatever the retention)
and no proxy data. Its guarantee is a convergence bound to the retrained optimum for
strongly convex losses, not bit-equality; on our non-convex models it is approximate.

The method. After the deletions, the server re-initialises the global model
(:math:`\theta_0` of the run) and every remaining client (the paper's :math:`q = 1`)
retrains locally on its remaining data :math:`\mathcal D^u_k` with a quasi-Newton step
whose Hessian is approximated by the diagonal empirical Fisher information, with momentum
on both the gradient and the Fisher estimate (:math:`\beta_1 = 0.9`,
:math:`\beta_2 = 0.999` in the paper). With :math:`g_i` the gradient of example :math:`i`
of a mini-batch :math:`B` (deleted samples already gone),

.. math::

    \bar g = \tfrac{1}{|B|} \textstyle\sum_{i \in B} g_i, \qquad
    \Gamma_B = \tfrac{1}{|B|} \textstyle\sum_{i \in B} g_i \odot g_i, \\
    m \leftarrow \beta_1 m + (1-\beta_1)\, \bar g, \qquad
    \Gamma \leftarrow \beta_2 \Gamma + (1-\beta_2)\, \Gamma_B, \\
    w \leftarrow w - \eta\, \frac{m / (1 - \beta_1^s)}{\Gamma / (1 - \beta_2^s) + \lambda},

(:math:`s` the step count), and the server averages the local models by example counts
(FedAvg) for ``rounds`` rounds (:math:`T_u`, fewer than the :math:`T` of training: where the
speed-up comes from).

Deviations and choices, stated:

* the damping :math:`\lambda` (``damping``) and the bias corrections are ours: the paper's
  update :math:`\Gamma^{-1}\Delta` is undefined where the Fisher estimate is zero, and its
  summary does not say how this is avoided;
* the optimiser state (:math:`m`, :math:`\Gamma`) starts afresh in every round (the paper
  does not say whether clients keep it across rounds);
* :math:`\eta` and :math:`\lambda` default to 0.01 (the paper's :math:`\eta` is 0.001 with
  mini-batches of 128 to 2,048; at our batch sizes of 16 to 64 and 20-round digits runs,
  :math:`\eta = 0.001` reached 0.79 test accuracy in :math:`T/4` rounds against retraining's
  0.91, :math:`\eta = \lambda = 0.01` 0.93), :math:`T_u` to a quarter of the run's rounds
  (the paper reports the speed-up at its own :math:`T_u`, not a rule for choosing it).

The method is sent to the clients as the client task ``rapid-retrain`` (this module's
:func:`rapid_retrain_task`); the records each client forgets stay on the client
(:mod:`fedforget.erasure`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedforget.data.array_dataset import ArrayDataset
from fedforget.errors import ConfigError, DataError
from fedforget.protocol import SEED
from fedforget.unlearning.base import (
    MethodParams,
    Unlearner,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
    check_range,
    register,
    weighted_sum,
)
from fedforget.unlearning.client_tasks import CLIENT_TASKS

TASK = "rapid-retrain"
LEARNING_RATE = "rapid-learning-rate"
DAMPING = "rapid-damping"
BETA1 = "rapid-beta1"
BETA2 = "rapid-beta2"


@dataclass(frozen=True)
class RapidRetrainParams(MethodParams):
    """Rapid retraining's parameters.

    Attributes
    ----------
    rounds : int
        :math:`T_u`, the retraining rounds; 0: a quarter of the run's rounds (at least 1).
    learning_rate : float
        :math:`\\eta > 0`.
    damping : float
        :math:`\\lambda > 0`, added to the Fisher estimate before it is inverted.
    beta1, beta2 : float
        Momentum of the gradient and of the Fisher estimate, in ``[0, 1)``.
    epochs : int
        Local epochs per round; 0: the run's.
    """

    rounds: int = 0
    learning_rate: float = 0.01
    damping: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    epochs: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter out of range."""
        check_range("rounds", self.rounds, low=0)
        check_range("learning-rate", self.learning_rate, low=0, low_open=True, high=math.inf,
                    high_open=True)
        check_range("damping", self.damping, low=0, low_open=True, high=math.inf,
                    high_open=True)
        check_range("beta1", self.beta1, low=0, high=1, high_open=True)
        check_range("beta2", self.beta2, low=0, high=1, high_open=True)
        check_range("epochs", self.epochs, low=0)


# --------------------------------------------------------------------- client side
def fisher_newton_train(model: nn.Module, data: ArrayDataset, *, epochs: int, batch_size: int,
                        seed: int, learning_rate: float, damping: float, beta1: float,
                        beta2: float) -> dict[str, float | int]:
    """Local retraining with the damped diagonal-Fisher Newton step (module docstring), in
    place; the data order is seeded as :func:`fedforget.training.train_local`'s."""
    from torch.func import functional_call, grad, vmap

    n = len(data)
    if n == 0:
        raise DataError(f"cannot retrain on data set {data.name!r}: no examples")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach().clone() for name, p in model.named_parameters()
              if p.requires_grad}
    buffers = {name: b for name, b in model.named_buffers()}

    def example_loss(p: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    x = torch.from_numpy(np.array(data.x))
    y = torch.from_numpy(np.array(data.y))
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            grads = per_example(params, x[batch], y[batch])
            steps += 1
            for k in names:
                g = grads[k]
                m[k].mul_(beta1).add_(g.mean(dim=0), alpha=1 - beta1)
                fisher[k].mul_(beta2).add_((g * g).mean(dim=0), alpha=1 - beta2)
                m_hat = m[k] / (1 - beta1 ** steps)
                f_hat = fisher[k] / (1 - beta2 ** steps)
                params[k] = params[k] - learning_rate * m_hat / (f_hat + damping)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])
        loss = float(F.cross_entropy(model(x), y))
    return {"num-examples": n, "train-loss": loss, "rapid-steps": steps}


@CLIENT_TASKS.register(TASK)
def rapid_retrain_task(model: nn.Module, train_data: ArrayDataset, holdout: ArrayDataset,
                       config: Mapping[str, Any]) -> Mapping[str, float | int]:
    """The client task ``rapid-retrain``: :func:`fisher_newton_train` on the client's data
    (its forgotten records already left out) from the received model."""
    def number(key: str) -> float:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"train config {key} = {value!r}: expected a number from the "
                              "server")
        return float(value)

    return fisher_newton_train(
        model, train_data, epochs=int(number("local-epochs")),
        batch_size=int(number("batch-size")), seed=int(number(SEED)),
        learning_rate=number(LEARNING_RATE), damping=number(DAMPING),
        beta1=number(BETA1), beta2=number(BETA2))


# --------------------------------------------------------------------- server side
@register
class RapidRetrain(Unlearner[RapidRetrainParams]):
    """Re-initialise and retrain with the Fisher-Newton step for T_u rounds (Liu et al.)."""

    name = "rapid-retrain"
    request_kinds = ("records", "client")
    Params = RapidRetrainParams

    def run(self, request: UnlearningRequest) -> UnlearningResult:  # noqa: D102
        store, federation = request.store, request.federation
        last = store.last_round
        rounds = self.params.rounds or max(1, last // 4)
        withdrawn = _withdrawn(store)
        clients = [c for c in federation.roster
                   if c not in request.forget and c not in withdrawn]
        if not clients:
            raise UnlearningError("rapid-retrain needs remaining clients to retrain; none is "
                                  "left")
        config = {LEARNING_RATE: self.params.learning_rate, DAMPING: self.params.damping,
                  BETA1: self.params.beta1, BETA2: self.params.beta2}
        model = store.global_model(0)
        notes = [f"re-initialised to θ_0 and retrained {rounds} rounds with the diagonal "
                 f"Fisher-Newton step over {len(clients)} clients (η = "
                 f"{self.params.learning_rate:g}, λ = {self.params.damping:g})"]
        for t in range(1, rounds + 1):
            updates = federation.train(server_round=t, global_model=model, clients=clients,
                                       local_epochs=self.params.epochs or None, task=TASK,
                                       extra_config=config)
            replied = [updates[c] for c in clients if c in updates]
            if not replied:
                raise UnlearningError(f"rapid-retrain round {t}: no client replied")
            total = sum(u.num_examples for u in replied)
            model = weighted_sum(((u.num_examples / total, u.local_model) for u in replied),
                                 model)
            request.report(t, model)
        return UnlearningResult(model=model, cost=federation.cost,
                                rounds_affected=list(range(1, last + 1)), notes=notes)


def _withdrawn(store: Any) -> frozenset[str]:
    from fedforget.withdrawal import WithdrawalLedger

    with WithdrawalLedger(store.directory) as ledger:
        return ledger.withdrawn()

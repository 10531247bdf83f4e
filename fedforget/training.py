r"""Local training and evaluation of a client model, deterministic in a seed.

The order of the examples in each epoch comes from a :class:`torch.Generator` seeded with
``seed``, never from the global random state, so the same model, data and seed give
bit-identical weights on every run and on every engine. Training works on whole tensors
sliced by a permutation (no ``DataLoader``): the models are small and the loader's overhead
would dominate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedforget.data.array_dataset import ArrayDataset
from fedforget.errors import ConfigError, DataError


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_local` reports.

    Attributes
    ----------
    num_examples : int
        Examples in the local data (the weight of this client in FedAvg).
    loss : float
        Mean cross-entropy over the examples of the last epoch, each batch's loss measured
        before its step; the FedProx term is not included.
    steps : int
        Optimizer steps taken.
    """

    num_examples: int
    loss: float
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` reports: example count, mean cross-entropy and accuracy."""

    num_examples: int
    loss: float
    accuracy: float


def train_local(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> TrainResult:
    r"""Train ``model`` in place with mini-batch SGD on cross-entropy.

    Each epoch visits the examples in the order of ``torch.randperm`` drawn from a
    generator seeded once with ``seed``; the last batch may be smaller.

    With ``proximal_mu`` :math:`= \mu > 0` the local objective is FedProx's
    (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
    https://arxiv.org/abs/1812.06127):

    .. math::

        h_k(w) = F_k(w) + \frac{\mu}{2} \lVert w - w^t \rVert^2,

    where :math:`F_k` is the client's mean cross-entropy and :math:`w^t` the weights at
    entry (the global model). Its gradient :math:`\mu (w - w^t)` is added to each
    mini-batch gradient, so a plain SGD step reads

    .. math::

        w \leftarrow w - \eta \left( \nabla F_k(w; B) + \mu (w - w^t) \right).

    With :math:`\mu = 0` the term is skipped and the steps are plain SGD.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place (all parameters with ``requires_grad``).
    data : ArrayDataset
        The local training data, not empty.
    epochs : int
        Passes over the data (run-config key ``local-epochs``), ``>= 1``.
    learning_rate : float
        SGD step size :math:`\eta` (``learning-rate``), ``> 0``.
    batch_size : int
        Examples per step (``batch-size``), ``>= 1``.
    seed : int
        Seed of the data order.
    proximal_mu : float
        :math:`\mu` (``proximal-mu``), ``>= 0``.
    momentum, weight_decay : float
        Passed to :class:`torch.optim.SGD`, ``>= 0``.

    Returns
    -------
    TrainResult
    """
    _check_positive_int("local-epochs", epochs)
    _check_positive_int("batch-size", batch_size)
    _check_number("learning-rate", learning_rate, strictly_positive=True)
    _check_number("proximal-mu", proximal_mu, strictly_positive=False)
    _check_number("momentum", momentum, strictly_positive=False)
    _check_number("weight-decay", weight_decay, strictly_positive=False)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"seed = {seed!r} is out of range; expected an integer in 0..2**64-1")
    n = len(data)
    if n == 0:
        raise DataError(f"cannot train on data set {data.name!r}: it has no examples")

    x = _as_tensor(data.x)
    y = _as_tensor(data.y)
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.SGD(
        params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    steps = 0
    epoch_loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        epoch_loss = torch.zeros(())
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            if anchors:
                _add_proximal_gradient(params, anchors, proximal_mu)
            optimizer.step()
            epoch_loss += loss.detach() * batch.shape[0]
            steps += 1
    return TrainResult(num_examples=n, loss=float(epoch_loss) / n, steps=steps)


@torch.no_grad()
def _add_proximal_gradient(
    params: list[nn.Parameter], anchors: list[torch.Tensor], mu: float
) -> None:
    """``grad += mu * (w - w_start)`` for every parameter (FedProx's proximal term)."""
    for param, anchor in zip(params, anchors, strict=True):
        if param.grad is None:
            param.grad = mu * (param - anchor)
        else:
            param.grad.add_(param - anchor, alpha=mu)


def evaluate(model: nn.Module, data: ArrayDataset, *, batch_size: int = 512) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data``.

    Runs in evaluation mode without gradients; the model's training mode is restored after.

    Raises
    ------
    DataError
        ``data`` has no examples (an accuracy over nothing is undefined).
    """
    _check_positive_int("batch-size", batch_size)
    n = len(data)
    if n == 0:
        raise DataError(f"cannot evaluate on data set {data.name!r}: it has no examples")
    x = _as_tensor(data.x)
    y = _as_tensor(data.y)
    total_loss = 0.0
    correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                logits = model(x[start : start + batch_size])
                target = y[start : start + batch_size]
                total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return EvalResult(num_examples=n, loss=total_loss / n, accuracy=correct / n)


def predict_proba(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities of ``model`` on the batch ``x``, ``float64`` ``(N, K)``."""
    _check_positive_int("batch-size", batch_size)
    inputs = _as_tensor(np.asarray(x, dtype=np.float32))
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                logits = model(inputs[start : start + batch_size])
                parts.append(torch.softmax(logits.double(), dim=1))
    finally:
        model.train(was_training)
    if not parts:
        raise DataError("cannot predict on an empty batch")
    return torch.cat(parts).numpy()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing memory with ``array``; read-only arrays are copied first."""
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _check_positive_int(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} = {value!r} is out of range; expected an integer >= 1")


def _check_number(key: str, value: float, *, strictly_positive: bool) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if strictly_positive else value >= 0)
    )
    if not ok:
        expected = "a number > 0" if strictly_positive else "a number >= 0"
        raise ConfigError(f"{key} = {value!r} is out of range; expected {expected}")

"""Client side of PGA: projected gradient ascent on the leaving client's own data.

Halimi, Kadhe, Rawat and Baracaldo, "Federated Unlearning: How to Efficiently Erase a Client
in FL?", 2022, https://arxiv.org/abs/2207.05521.

The leaving client maximises its empirical loss :math:`F_u` within the :math:`\\ell_2` ball
:math:`\\Omega = \\{w : \\lVert w - w_{\\text{ref}} \\rVert_2 \\le \\delta\\}` around the
reference model, starting from :math:`w_{\\text{ref}}`:

.. math::

    w \\leftarrow \\mathcal{P}_\\Omega\\bigl(w + \\eta_u \\nabla F_u(w; B)\\bigr),
    \\qquad
    \\mathcal{P}_\\Omega(w) = w_{\\text{ref}} + (w - w_{\\text{ref}})
        \\min\\Bigl(1, \\frac{\\delta}{\\lVert w - w_{\\text{ref}} \\rVert_2}\\Bigr),

the norm taken over all parameters together. As in the authors' released code
(https://github.com/IBM/federated-unlearning, ``federated_unlearning.ipynb``):

* the step is SGD with momentum (``pga-momentum``; the authors use 0.9 with learning rate
  0.01), the momentum buffer kept across projections;
* each mini-batch gradient is clipped to a maximal norm before the step (``clip_grad_norm_``,
  the authors use 5): cross-entropy is unbounded above, and one step of plain ascent can be
  huge;
* **distance stop**: after every step, the ascent ends once the model is farther than
  ``pga-stop-distance`` from the client's own last local model :math:`w_u^{T}` (the
  *anchor*, sent by the server in ``pga-anchor``): :math:`\\lVert w - w_u^{T} \\rVert_2 >
  \\tau` means the model has moved far enough from what the client contributed. The
  authors compare the *squared* distance with 2.2 (their ``get_distance`` returns
  :math:`\\lVert\\cdot\\rVert^2`); here :math:`\\tau` is an ℓ2 distance (their 2.2 is
  :math:`\\tau = \\sqrt{2.2} \\approx 1.48`).

The paper also stops early once the (clean) validation accuracy falls below a threshold
(not in the authors' code); here, when ``pga-min-accuracy`` > 0, the accuracy on
``validation`` (by default the ascent data) is checked before the first step and after
every step.

On the wire (a Flower train message whose config has ``task = "pga"``): the message's
arrays are :math:`w_{\\text{ref}}`, the starting point *and* the centre of the ball; the
settings are ``local-epochs``, ``batch-size`` and ``seed`` (as for training) and the keys
of :data:`CONFIG_KEYS` (the last three optional, off when absent), parsed by
:func:`ascent_kwargs`. ``pga-anchor`` is the anchor model as bytes of
:func:`fedforget.tensors.encode` (fp32). The reply carries the final model and
:meth:`AscentResult.metrics`.
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
from fedforget.training import evaluate
from fedforget.unlearning.client_tasks import CLIENT_TASKS

TASK = "pga"
"""Value of the train config key ``task`` that selects this procedure."""

RADIUS = "pga-radius"
LEARNING_RATE = "pga-learning-rate"
CLIP_GRAD_NORM = "pga-clip-grad-norm"
MIN_ACCURACY = "pga-min-accuracy"
MOMENTUM = "pga-momentum"
STOP_DISTANCE = "pga-stop-distance"
ANCHOR = "pga-anchor"
CONFIG_KEYS = (RADIUS, LEARNING_RATE, CLIP_GRAD_NORM, MIN_ACCURACY, MOMENTUM, STOP_DISTANCE,
               ANCHOR)
"""The PGA-specific train config keys (beyond ``local-epochs``, ``batch-size``, ``seed``)."""


@dataclass(frozen=True)
class AscentResult:
    """What :func:`projected_gradient_ascent` reports.

    Attributes
    ----------
    num_examples : int
        Examples in the ascent data.
    loss : float
        Mean cross-entropy of the final model on the ascent data.
    steps : int
        Ascent steps taken.
    stopped_early : bool
        Whether the accuracy check or the distance stop ended the ascent.
    distance : float
        :math:`\\lVert w - w_{\\text{ref}} \\rVert_2` of the final model.
    accuracy : float
        Accuracy of the final model on the validation data (NaN if never checked).
    anchor_distance : float
        :math:`\\lVert w - w_u^{T} \\rVert_2` of the final model (NaN without an anchor).
    stop_reason : str
        ``""`` (all epochs ran), ``"accuracy"`` or ``"distance"``.
    """

    num_examples: int
    loss: float
    steps: int
    stopped_early: bool
    distance: float
    accuracy: float = math.nan
    anchor_distance: float = math.nan
    stop_reason: str = ""

    def metrics(self) -> dict[str, float | int]:
        """The reply's metrics (kebab-case keys; NaN accuracy left out)."""
        out: dict[str, float | int] = {
            "num-examples": self.num_examples,
            "train-loss": self.loss,
            "pga-steps": self.steps,
            "pga-stopped-early": int(self.stopped_early),
            "pga-distance": self.distance,
        }
        if not math.isnan(self.accuracy):
            out["pga-accuracy"] = self.accuracy
        if not math.isnan(self.anchor_distance):
            out["pga-anchor-distance"] = self.anchor_distance
        if self.stop_reason:
            out["pga-stopped-by-distance"] = int(self.stop_reason == "distance")
        return out


def ascent_config(
    *, radius: float, learning_rate: float, clip_grad_norm: float, min_accuracy: float,
    momentum: float = 0.0, stop_distance: float = 0.0,
    anchor: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float | bytes]:
    """The PGA keys of a train message's config (server side).

    ``anchor`` (the client's last local model) and ``stop_distance`` > 0 turn the distance
    stop on; both or neither are given.
    """
    if (anchor is None) != (stop_distance <= 0):
        raise ConfigError(
            f"{STOP_DISTANCE} = {stop_distance!r} with "
            f"{'no' if anchor is None else 'an'} anchor model; expected both or neither")
    out: dict[str, float | bytes] = {
        RADIUS: float(radius),
        LEARNING_RATE: float(learning_rate),
        CLIP_GRAD_NORM: float(clip_grad_norm),
        MIN_ACCURACY: float(min_accuracy),
        MOMENTUM: float(momentum),
    }
    if anchor is not None:
        from fedforget.tensors import encode

        out[STOP_DISTANCE] = float(stop_distance)
        out[ANCHOR] = encode({k: np.asarray(v, np.float32) for k, v in anchor.items()}, "fp32")
    return out


def ascent_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`projected_gradient_ascent` from a train config (client side).

    Reads ``local-epochs``, ``batch-size``, ``fedforget.seed`` and :data:`CONFIG_KEYS`; a
    ``pga-clip-grad-norm``, ``pga-min-accuracy``, ``pga-momentum`` or
    ``pga-stop-distance`` of 0 (or, for the last three, absent) turns that feature off.

    Raises
    ------
    ConfigError
        Naming the key that is missing or not a number.
    """

    def number(key: str) -> float:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"train config {key} = {value!r}: expected a number from the server")
        return float(value)

    def optional(key: str) -> float:
        return number(key) if key in config else 0.0

    clip = number(CLIP_GRAD_NORM)
    min_accuracy = number(MIN_ACCURACY)
    stop = optional(STOP_DISTANCE)
    anchor = None
    if stop:
        blob = config.get(ANCHOR)
        if not isinstance(blob, bytes):
            raise ConfigError(f"train config {STOP_DISTANCE} = {stop!r} but {ANCHOR} = "
                              f"{type(blob).__name__}; expected the anchor model's bytes")
        from fedforget.tensors import decode

        anchor = decode(blob)
    return {
        "radius": number(RADIUS),
        "epochs": int(number("local-epochs")),
        "learning_rate": number(LEARNING_RATE),
        "batch_size": int(number("batch-size")),
        "seed": int(number(SEED)),
        "clip_grad_norm": clip or None,
        "min_accuracy": min_accuracy or None,
        "momentum": optional(MOMENTUM),
        "stop_distance": stop or None,
        "anchor": anchor,
    }


def projected_gradient_ascent(
    model: nn.Module,
    data: ArrayDataset,
    *,
    reference: Mapping[str, torch.Tensor | np.ndarray],
    radius: float,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    clip_grad_norm: float | None = None,
    min_accuracy: float | None = None,
    validation: ArrayDataset | None = None,
    momentum: float = 0.0,
    stop_distance: float | None = None,
    anchor: Mapping[str, torch.Tensor | np.ndarray] | None = None,
) -> AscentResult:
    """Maximise the cross-entropy on ``data`` in place, within the ball around ``reference``.

    Each epoch visits the examples in the order of ``torch.randperm`` drawn from a
    generator seeded once with ``seed`` (as :func:`fedforget.training.train_local`): the
    same inputs give bit-identical weights. The model is projected into the ball before the
    first step too, so the result always lies in it (up to float32 rounding).

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place (all parameters with ``requires_grad``); usually loaded with
        ``reference``.
    data : ArrayDataset
        The client's data to forget, not empty.
    reference : mapping of str to tensor or array
        :math:`w_{\\text{ref}}`, by parameter name (extra entries are ignored).
    radius : float
        :math:`\\delta > 0` (``pga-radius``).
    epochs : int
        Passes over the data (``local-epochs``), ``>= 1``.
    learning_rate : float
        :math:`\\eta_u > 0` (``pga-learning-rate``).
    batch_size : int
        Examples per step (``batch-size``), ``>= 1``.
    seed : int
        Seed of the data order.
    clip_grad_norm : float or None
        Maximal norm of each mini-batch gradient (``pga-clip-grad-norm``); None: no clipping.
    min_accuracy : float or None
        Stop once the accuracy on ``validation`` is below this (``pga-min-accuracy``);
        None: never.
    validation : ArrayDataset or None
        Data of the accuracy check; None: ``data``.
    momentum : float
        SGD momentum in [0, 1) (``pga-momentum``); the buffer survives the projections.
    stop_distance : float or None
        :math:`\\tau`: stop once :math:`\\lVert w - w_u^T \\rVert_2 > \\tau` after a step
        (``pga-stop-distance``); None: never. Needs ``anchor``.
    anchor : mapping of str to tensor or array, optional
        :math:`w_u^T`, the client's last local model, by parameter name.

    Returns
    -------
    AscentResult
    """
    _check(radius > 0 and math.isfinite(radius), RADIUS, radius, "a finite number > 0")
    _check(_is_int(epochs) and epochs >= 1, "local-epochs", epochs, "an integer >= 1")
    _check(learning_rate > 0 and math.isfinite(learning_rate), LEARNING_RATE, learning_rate,
           "a finite number > 0")
    _check(_is_int(batch_size) and batch_size >= 1, "batch-size", batch_size, "an integer >= 1")
    _check(_is_int(seed) and 0 <= seed < 2**64, "seed", seed, "an integer in 0..2**64-1")
    _check(clip_grad_norm is None or clip_grad_norm > 0, CLIP_GRAD_NORM, clip_grad_norm,
           "a number > 0 or None")
    _check(min_accuracy is None or 0 <= min_accuracy <= 1, MIN_ACCURACY, min_accuracy,
           "a number in [0, 1] or None")
    _check(0 <= momentum < 1, MOMENTUM, momentum, "a number in [0, 1)")
    _check(stop_distance is None or (stop_distance > 0 and math.isfinite(stop_distance)),
           STOP_DISTANCE, stop_distance, "a finite number > 0 or None")
    _check((stop_distance is None) == (anchor is None), ANCHOR,
           "given" if anchor is not None else None,
           f"an anchor model exactly when {STOP_DISTANCE} is set")
    n = len(data)
    if n == 0:
        raise DataError(f"cannot run gradient ascent on data set {data.name!r}: no examples")

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, _ in named if name not in reference]
    if missing:
        raise ConfigError(f"the reference model lacks parameters {missing}")
    params = [p for _, p in named]
    centre = [torch.as_tensor(np.asarray(reference[name]), dtype=p.dtype).reshape(p.shape)
              for name, p in named]
    anchor_list = None
    if anchor is not None:
        lacking = [name for name, _ in named if name not in anchor]
        if lacking:
            raise ConfigError(f"the anchor model lacks parameters {lacking}")
        anchor_list = [torch.as_tensor(np.asarray(anchor[name]), dtype=torch.float64)
                       .reshape(p.shape) for name, p in named]
    x, y = _as_tensor(data.x), _as_tensor(data.y)
    check_data = validation if validation is not None else data
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)

    distance = project_to_ball(params, centre, radius)
    accuracy = math.nan
    reason = ""
    if min_accuracy is not None:
        accuracy = evaluate(model, check_data).accuracy
        reason = "accuracy" if accuracy < min_accuracy else ""
    anchor_distance = _distance(params, anchor_list) if anchor_list is not None else math.nan
    steps = 0
    model.train()
    for _ in range(epochs):
        if reason:
            break
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            (-loss).backward()  # descending on -F ascends F
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            optimizer.step()
            distance = project_to_ball(params, centre, radius)
            steps += 1
            if anchor_list is not None and stop_distance is not None:
                anchor_distance = _distance(params, anchor_list)
                if anchor_distance > stop_distance:
                    reason = "distance"
                    break
            if min_accuracy is not None:
                accuracy = evaluate(model, check_data).accuracy
                if accuracy < min_accuracy:
                    reason = "accuracy"
                    break
    final = evaluate(model, data)
    return AscentResult(num_examples=n, loss=final.loss, steps=steps,
                        stopped_early=bool(reason), distance=distance, accuracy=accuracy,
                        anchor_distance=anchor_distance, stop_reason=reason)


@torch.no_grad()
def _distance(params: list[nn.Parameter], other: list[torch.Tensor]) -> float:
    """:math:`\\lVert w - v \\rVert_2` over all tensors, in float64."""
    return math.sqrt(sum(float(((p.detach().double() - o) ** 2).sum())
                         for p, o in zip(params, other, strict=True)))


@torch.no_grad()
def project_to_ball(
    params: list[torch.Tensor] | list[nn.Parameter], centre: list[torch.Tensor], radius: float
) -> float:
    """Project ``params`` in place onto :math:`\\{w : \\lVert w - c \\rVert_2 \\le \\delta\\}`.

    .. math:: w \\leftarrow c + (w - c) \\min\\bigl(1, \\delta / \\lVert w - c \\rVert_2\\bigr)

    The norm is taken over all tensors together, accumulated in float64.

    Returns
    -------
    float
        :math:`\\lVert w - c \\rVert_2` after the projection (float64 arithmetic).
    """
    diffs = [p.detach().double() - c.double() for p, c in zip(params, centre, strict=True)]
    norm = math.sqrt(sum(float((d * d).sum()) for d in diffs))
    if norm <= radius:
        return norm
    scale = radius / norm
    for p, c, d in zip(params, centre, diffs, strict=True):
        p.copy_((c.double() + d * scale).to(p.dtype))
    return math.sqrt(sum(float(((p.detach().double() - c.double()) ** 2).sum())
                         for p, c in zip(params, centre, strict=True)))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is out of range; expected {expected}")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@CLIENT_TASKS.register(TASK)
def pga_task(model: nn.Module, train_data: ArrayDataset, holdout: ArrayDataset,
             config: Mapping[str, Any]) -> Mapping[str, float | int]:
    """The client task ``pga``: ascent from the received model, which is also the centre
    of the ball; the held-out split is the paper's validation data for the early stop."""
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = projected_gradient_ascent(
        model, train_data, reference=reference, **ascent_kwargs(config),
        validation=holdout if len(holdout) else None,
    )
    return result.metrics()

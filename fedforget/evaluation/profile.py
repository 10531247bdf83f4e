r"""The clients' own figures for :mod:`fedforget.evaluation.collateral`, and the probe.

The server sends every remaining client a train message whose config names the client task
``profile`` (:data:`TASK`) with a model and a *probe* of the forgotten data: its label
distribution :math:`p_F` (:data:`PROBE_LABELS`), its mean penultimate representation
:math:`\bar z_F` under the original model and the centre :math:`\bar z_0`
(:data:`PROBE_EMBEDDING`, :data:`PROBE_CENTRE`). The client answers, from its own data only,

* ``accuracy`` and ``loss`` of the model on its held-out data (without the labels a class
  request forgets: the figure is about the other classes), over ``profile-examples``;
* ``label-similarity`` :math:`1 - \mathrm{TV}(p_k, p_F)` of its training labels;
* ``representation-similarity`` :math:`\cos(\bar z_k - \bar z_0, \bar z_F - \bar z_0)`;

and returns the model unchanged. The similarities are of the client's training data as it
was, the forgotten records or class included (a client that held them is the most similar);
the task may read them (``sees_forgotten_data``: it trains nothing). The server never sees
a client's data, only these figures
(and, in simulation, builds the probe from the forgotten data it can rebuild; a departing
client can compute its own probe with :data:`PROBE_ROLE`, answering ``probe-label-<c>``
and ``probe-z-<i>``).

The representation of an input is what the model's last :class:`torch.nn.Linear` layer
receives (the hidden layer of the MLP, the flattened feature maps of the CNN, the input
itself for logistic regression).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedforget.data.array_dataset import ArrayDataset
from fedforget.erasure import labels_of, without
from fedforget.errors import FedForgetError
from fedforget.training import evaluate
from fedforget.unlearning.base import Cost
from fedforget.unlearning.client_tasks import CLIENT_TASKS

__all__ = ["PROBE_CENTRE", "PROBE_EMBEDDING", "PROBE_LABELS", "PROBE_ROLE", "TASK", "Probe",
           "label_distribution", "make_probe", "mean_representation", "profile_task",
           "representations"]

TASK = "profile"
PROBE_LABELS = "fedforget.probe-labels"
PROBE_EMBEDDING = "fedforget.probe-embedding"
PROBE_CENTRE = "fedforget.probe-centre"
PROBE_ROLE = "fedforget.probe-role"  # true: answer the probe of one's own data


class ProfileError(FedForgetError):
    """A model or a probe cannot give the figures asked."""


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ProfileError(f"{type(model).__name__} has no linear layer; the representation "
                           "is the input of the last nn.Linear")
    return linears[-1]


def representations(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """What the last linear layer receives for each input, ``float64`` ``(N, D)``."""
    layer = _last_linear(model)
    parts: list[torch.Tensor] = []

    def keep(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        parts.append(args[0].detach().double().reshape(args[0].shape[0], -1))

    handle = layer.register_forward_pre_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = torch.from_numpy(np.array(x, dtype=np.float32))
            for start in range(0, inputs.shape[0], batch_size):
                model(inputs[start:start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    if not parts:
        raise ProfileError("no input to represent")
    return torch.cat(parts).numpy()


def mean_representation(model: nn.Module, data: ArrayDataset) -> np.ndarray:
    """:math:`\\bar z` of ``data``."""
    return representations(model, data.x).mean(axis=0)


def label_distribution(data: ArrayDataset) -> np.ndarray:
    """The fraction of each class in ``data`` (``num_classes`` values)."""
    counts = data.class_counts().astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """:math:`a \\cdot b / (\\lVert a \\rVert \\lVert b \\rVert)`; None for a zero vector."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return None
    return float(np.dot(a, b) / (na * nb))


@dataclass(frozen=True)
class Probe:
    """The forgotten data as the clients compare themselves with it."""

    labels: tuple[float, ...]
    embedding: tuple[float, ...]
    centre: tuple[float, ...]

    def config(self) -> dict[str, Any]:
        """Train-config entries of the profile message."""
        return {PROBE_LABELS: list(self.labels), PROBE_EMBEDDING: list(self.embedding),
                PROBE_CENTRE: list(self.centre)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Probe | None:
        """The probe a profile message carries (None when it carries none)."""
        if PROBE_LABELS not in config:
            return None
        return cls(tuple(float(v) for v in config[PROBE_LABELS]),
                   tuple(float(v) for v in config.get(PROBE_EMBEDDING, ())),
                   tuple(float(v) for v in config.get(PROBE_CENTRE, ())))


def make_probe(model: nn.Module, forgotten: ArrayDataset, centre_data: ArrayDataset) -> Probe:
    """The probe of ``forgotten`` under ``model`` (the original model), centred on the mean
    representation of ``centre_data`` (the server's test set)."""
    return Probe(tuple(label_distribution(forgotten).tolist()),
                 tuple(mean_representation(model, forgotten).tolist()),
                 tuple(mean_representation(model, centre_data).tolist()))


def similarities(model: nn.Module, data: ArrayDataset, probe: Probe
                 ) -> tuple[float | None, float | None]:
    """(label similarity, representation similarity) of ``data`` to ``probe``."""
    if not len(data):
        return None, None
    p = label_distribution(data)
    q = np.asarray(probe.labels, dtype=np.float64)
    label = 1.0 - 0.5 * float(np.abs(p - q).sum()) if p.shape == q.shape else None
    rep = None
    if probe.embedding:
        centre = np.asarray(probe.centre or np.zeros(len(probe.embedding)), dtype=np.float64)
        mine = mean_representation(model, data)
        if mine.shape == centre.shape:
            rep = cosine(mine - centre, np.asarray(probe.embedding) - centre)
    return label, rep


def profile_task(model: nn.Module, train_data: ArrayDataset, holdout: ArrayDataset,
                 config: Mapping[str, Any]) -> Mapping[str, float | int]:
    """The client task ``profile`` (see the module); the model is left unchanged."""
    if config.get(PROBE_ROLE):
        out: dict[str, float | int] = {"num-examples": max(1, len(train_data))}
        if len(train_data):
            for c, v in enumerate(label_distribution(train_data)):
                out[f"probe-label-{c}"] = float(v)
            for i, v in enumerate(mean_representation(model, train_data)):
                out[f"probe-z-{i}"] = float(v)
        return out
    held = without(holdout, labels=labels_of(config))
    out = {"num-examples": max(1, len(held)), "profile-examples": len(held)}
    if len(held):
        result = evaluate(model, held)
        out["accuracy"] = result.accuracy
        out["loss"] = result.loss
    probe = Probe.from_config(config)
    if probe is not None:
        label, rep = similarities(model, train_data, probe)
        if label is not None:
            out["label-similarity"] = label
        if rep is not None and math.isfinite(rep):
            out["representation-similarity"] = rep
    return out


# the similarity is of the client's data as it was: a client that held the forgotten class
# or records is the most similar to them (the accuracy leaves the forgotten labels out)
profile_task.sees_forgotten_data = True  # type: ignore[attr-defined]
CLIENT_TASKS.register(TASK, profile_task)


def probe_from_metrics(metrics: Mapping[str, float], centre: Sequence[float]) -> Probe | None:
    """The probe a client answered with :data:`PROBE_ROLE` (None when it sent none)."""
    labels = [metrics[k] for k in sorted((k for k in metrics if k.startswith("probe-label-")),
                                         key=lambda k: int(k.rsplit("-", 1)[1]))]
    z = [metrics[k] for k in sorted((k for k in metrics if k.startswith("probe-z-")),
                                    key=lambda k: int(k.rsplit("-", 1)[1]))]
    if not labels:
        return None
    return Probe(tuple(labels), tuple(z), tuple(centre))


def ask_probe(federation: Any, model: Mapping[str, np.ndarray], client: str,
              centre: Sequence[float]) -> Probe | None:
    """The probe of ``client``'s own data, answered by the client (a departing client that
    still answers, in a deployment where the server cannot rebuild its data)."""
    saved = federation.cost
    federation.cost = Cost()
    try:
        replies = federation.train(server_round=0, global_model=dict(model),
                                   clients=[client], task=TASK,
                                   extra_config={PROBE_ROLE: True})
    finally:
        federation.cost = saved
    reply = replies.get(client)
    return None if reply is None else probe_from_metrics(reply.metrics, centre)


def ask_profiles(federation: Any, model: Mapping[str, np.ndarray], clients: Sequence[str],
                 probe: Probe | None) -> dict[str, dict[str, float]]:
    """Ask ``clients`` for their profile of ``model`` (each from its own data); the
    messages are measurement, not unlearning: they are not counted in the cost."""
    saved = federation.cost  # train() adds to the object in place: count into a scratch
    federation.cost = Cost()
    try:
        replies = federation.train(server_round=0, global_model=dict(model),
                                   clients=list(clients), task=TASK,
                                   extra_config=probe.config() if probe is not None else {})
    finally:
        federation.cost = saved
    return {cid: dict(update.metrics) for cid, update in replies.items()}

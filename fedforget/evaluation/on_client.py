"""Figures on a forgotten client's own data, computed on that client's node, if it consents.

In a simulation the server can rebuild every client's partition from the run config, and
:class:`fedforget.measure.TaskMeasure` does. A deployed server holds no client data: what
is measured on the forgotten client's data is asked of that client, through a Flower
message, and only if the node's operator consented (node config ``fedforget-consent=true``,
:data:`CONSENT_KEY`). Otherwise the figure is *not available* — never estimated from data
the server should not hold.

Protocol: the server sends the forgotten client one train message per model
(``original``, ``unlearned``, ``retrained``) whose config has ``fedforget.task =``
:data:`MEASURE_TASK`; fedforget's client mod answers it with an error reply when the node
has not consented (:func:`consents`); otherwise the client task :func:`measure_forgotten`
runs on the client's data and replies, besides the (unchanged) arrays, only aggregate
figures:

* ``forgotten-accuracy`` — accuracy of the model on the client's training data;
* ``mia-loss-auc``, ``mia-confidence-auc`` — the ROC AUC of the loss-threshold and the
  confidence-threshold membership-inference attacks (Yeom et al., 2018) with the client's
  training data as members and its held-out split as non-members
  (:func:`fedforget.evaluation.membership.loss_threshold_auc`,
  :func:`~fedforget.evaluation.membership.confidence_threshold_auc`, the functions the
  server uses in simulation); absent when the client has no held-out example;
* ``num-examples`` and ``num-holdout``.

No example, loss or prediction of the client leaves the node. With several forgotten
clients the server pools ``forgotten-accuracy`` exactly (weighted by ``num-examples``); an
AUC cannot be pooled from per-client AUCs, so the pooled attack figures are given only when
one client answered, and each client's own are kept under ``forgotten_by_client``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from torch import nn

from fedforget.arrays import TensorDict
from fedforget.data.array_dataset import ArrayDataset
from fedforget.unlearning.base import Cost
from fedforget.unlearning.client_tasks import CLIENT_TASKS

log = logging.getLogger("fedforget.server")

__all__ = ["CONSENT_KEY", "MEASURE_TASK", "ask_forgotten_figures", "consents",
           "is_deployment_grid", "measure_forgotten"]

MEASURE_TASK = "measure-forgotten"
"""``fedforget.task`` of the message that asks a client for figures on its own data."""

CONSENT_KEY = "fedforget-consent"
"""Node-config key by which a node's operator consents to :data:`MEASURE_TASK`."""

FIGURES = ("forgotten_accuracy", "mia_loss_auc", "mia_confidence_auc")
"""The result figures that come from the forgotten clients' data."""


def consents(node_config: Mapping[str, Any]) -> bool:
    """Whether the node's operator consented to figures on its data (``fedforget-consent``
    is ``true``, ``1`` or ``yes``)."""
    value = node_config.get(CONSENT_KEY, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return str(value).strip().lower() in ("true", "1", "yes")


def measure_forgotten(model: nn.Module, train_data: ArrayDataset, holdout: ArrayDataset,
                      config: Mapping[str, Any]) -> dict[str, float | int]:
    """The client task :data:`MEASURE_TASK`: aggregate figures of ``model`` on this client's
    training data and held-out split (see the module); ``model`` is left unchanged."""
    from fedforget.evaluation.membership import (  # noqa: PLC0415
        confidence_threshold_auc,
        loss_threshold_auc,
    )
    from fedforget.training import evaluate  # noqa: PLC0415

    was_training = model.training
    model.eval()
    try:
        out: dict[str, float | int] = {"num-examples": len(train_data),
                                       "num-holdout": len(holdout)}
        if len(train_data):
            out["forgotten-accuracy"] = float(evaluate(model, train_data).accuracy)
        if len(train_data) and len(holdout):
            out["mia-loss-auc"] = float(loss_threshold_auc(model, train_data, holdout))
            out["mia-confidence-auc"] = float(confidence_threshold_auc(model, train_data,
                                                                       holdout))
        return out
    finally:
        model.train(was_training)


CLIENT_TASKS.register(MEASURE_TASK, measure_forgotten)


def is_deployment_grid(grid: Any) -> bool:
    """Whether ``grid`` (or the Grid it wraps, as ``.grid``) is Flower's deployment Grid
    (a SuperLink's), as opposed to fedforget's in-process Grid or the simulation's."""
    chain, inner = [], grid
    for _ in range(8):
        if inner is None:
            break
        chain.append(inner)
        inner = getattr(inner, "grid", None)
    if chain and all(type(g).__module__.startswith("fedforget.") for g in chain):
        # fedforget's own grids (the in-process one, and wrappers that hold any other grid
        # as .grid): not a deployment, known without importing Flower's grid package (~1 s)
        return False
    try:
        from flwr.superlink.grid.http_grid import HttpGrid  # noqa: PLC0415
    except ImportError:  # another Flower layout: take it for a deployment unless known
        return grid is not None and "inmemory" not in type(grid).__module__ and \
            not type(grid).__module__.startswith("fedforget.")
    for _ in range(8):
        if grid is None:
            return False
        if isinstance(grid, HttpGrid):
            return True
        grid = getattr(grid, "grid", None)
    return False


def ask_forgotten_figures(federation: Any, models: Mapping[str, TensorDict],
                          forget: Collection[str]) -> dict[str, Any]:
    """Ask each forgotten client for :func:`measure_forgotten` on each of ``models``.

    Returns the result figures :data:`FIGURES` (``{model: value}`` or None where not
    available), ``forgotten_by_client`` (``{client: {model: {figure: value}}}``) and
    ``forgotten_figures`` (where the figures come from, and who did not answer and why).
    Nothing of this is counted as the method's cost.
    """
    wanted = sorted(forget)
    connected = [cid for cid in wanted if cid in getattr(federation, "clients", {})]
    per_client: dict[str, dict[str, dict[str, float]]] = {}
    saved_cost = federation.cost
    federation.cost = Cost()  # train() adds to the counter in place
    try:
        for name, model in models.items():
            if not connected:
                break
            updates = federation.train(server_round=0, global_model=model, clients=connected,
                                       task=MEASURE_TASK)
            for cid, update in updates.items():
                figures = {k: float(v) for k, v in update.metrics.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)
                           and k != "train-seconds"}
                figures["num-examples"] = float(update.num_examples)
                per_client.setdefault(cid, {})[name] = figures
    finally:
        federation.cost = saved_cost
    answered = sorted(cid for cid, figures in per_client.items() if len(figures) == len(models))
    missing = {cid: ("not connected" if cid not in connected
                     else "refused or did not answer (no consent: node config "
                          f"{CONSENT_KEY}=true is not set, or no reply)")
               for cid in wanted if cid not in answered}
    out: dict[str, Any] = {key: None for key in FIGURES}
    if answered:
        accuracy: dict[str, float] = {}
        for name in models:
            pairs = [(per_client[cid][name].get("forgotten-accuracy"),
                      per_client[cid][name].get("num-examples", 0.0)) for cid in answered]
            total = sum(n for a, n in pairs if a is not None)
            if total > 0:
                accuracy[name] = float(sum(a * n for a, n in pairs if a is not None) / total)
        out["forgotten_accuracy"] = accuracy or None
        if len(answered) == 1:
            only = per_client[answered[0]]
            for figure, key in (("mia_loss_auc", "mia-loss-auc"),
                                ("mia_confidence_auc", "mia-confidence-auc")):
                values = {name: only[name][key] for name in models if key in only[name]}
                out[figure] = values if len(values) == len(models) else None
    out["forgotten_by_client"] = {cid: per_client[cid] for cid in answered} or None
    if not answered:
        source = "not available: no forgotten client answered"
    elif missing:
        source = f"on the clients' nodes ({len(answered)} of {len(wanted)} answered)"
    else:
        source = "on the clients' nodes"
    out["forgotten_figures"] = {"source": source, "answered": answered, "missing": missing}
    if missing:
        log.warning("figures on the forgotten data are not available from %s",
                    ", ".join(f"{cid} ({why})" for cid, why in missing.items()))
    return out


"""Client-side procedures of unlearning methods, registered by name.

A method that needs a client to do something other than ordinary local training (PGA's
projected gradient ascent) sends a train message whose config has ``task = <name>``; the
ClientApp looks the procedure up in :data:`CLIENT_TASKS` and runs it on its own data. A new
procedure is one module with a :class:`ClientTask` function and one
``CLIENT_TASKS.register`` line (and its module in :data:`TASK_MODULES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

from fedforget.data.array_dataset import ArrayDataset
from fedforget.registry import Registry

TASK_MODULES = ("fedforget.unlearning.ascent", "fedforget.evaluation.profile",
                "fedforget.unlearning.rapid_retrain", "fedforget.unlearning.fucp",
                "fedforget.evaluation.on_client")
"""The modules that register the shipped client tasks."""

TRAIN = "train"
"""The ``task`` of ordinary local training (not in the registry: every ClientApp has it)."""


class ClientTask(Protocol):
    """``task(model, train_data, holdout, config) -> metrics``.

    ``model`` holds the received arrays and is changed in place into the reply's model;
    ``train_data`` and ``holdout`` are the client's training and held-out splits; ``config``
    is the train message's config (the task's settings). The returned metrics go into the
    reply's MetricRecord and must include ``num-examples``.
    """

    def __call__(self, model: nn.Module, train_data: ArrayDataset, holdout: ArrayDataset,
                 config: Mapping[str, Any]) -> Mapping[str, float | int]: ...


CLIENT_TASKS: Registry[ClientTask] = Registry("client task", builtins=TASK_MODULES)

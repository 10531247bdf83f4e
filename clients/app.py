"""fedforget's own Flower ClientApp: local training and evaluation on one client's data.

The client protocol (identify, the stable id in every reply, the per-round seed, the saved
tree head) is spoken by fedforget's client mod (:mod:`fedforget.clients.mod`), exactly as in
a user's app. The server sends everything that shapes local training in each train message:
``local-epochs``, ``learning-rate``, ``batch-size``, ``fedforget.seed`` (the data order), and
``proximal-mu`` under FedProx; a train message whose config names a ``fedforget.task``
runs that client-side procedure of an unlearning method instead
(:data:`fedforget.unlearning.client_tasks.CLIENT_TASKS`, e.g. PGA's ascent).

Erasure below the level of the client (:mod:`fedforget.erasure`): before every train message
the client drops the records its state directory lists (``forgotten-records.json``) and the
examples of the labels the config names (``fedforget.forget-labels``).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedforget import protocol
from fedforget.arrays import from_array_record, load_tensors, model_array_record
from fedforget.cache import FederationCache
from fedforget.clients.mod import client_id_of, state_dir_of, unlearning_mod_with
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset, poison
from fedforget.erasure import client_records, labels_of, without
from fedforget.errors import ClientReplyError, ConfigError
from fedforget.sampling import derive_seed
from fedforget.settings import app_run_config
from fedforget.task import load_client_data, new_model
from fedforget.training import evaluate, train_local
from fedforget.unlearning.client_tasks import CLIENT_TASKS, TRAIN


@lru_cache(maxsize=4)
def _config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def run_config_of(context: Context) -> RunConfig:
    """The app's run configuration (parsed once per distinct config)."""
    return _config_of_items(tuple(context.run_config.items()))


@lru_cache(maxsize=8)
def _config_of_items(items: tuple[tuple[str, object], ...]) -> RunConfig:
    # Keyed on the run config as it comes (no filtering or sorting on every message): a
    # config seen in another key order is parsed again, to the same RunConfig.
    return _config(tuple(sorted(app_run_config(dict(items)).items())))


def local_data(
    context: Context, cfg: RunConfig | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """This client's (train, held-out) data.

    With the experiment option ``backdoor-clients``, a listed client plants a backdoor:
    a seeded ``backdoor-fraction`` of its training examples carry the trigger and the label
    ``backdoor-target``.
    """
    cfg = cfg if cfg is not None else run_config_of(context)
    key = (cfg, int(context.node_config.get("partition-id", 0)), client_id_of(context))
    # sized to the federation: every client of this run (and of one more) stays cached
    return _LOCAL_DATA.get(key, lambda: _local_data(*key), capacity=2 * cfg.num_clients)


_LOCAL_DATA: FederationCache[tuple[ArrayDataset, ArrayDataset]] = FederationCache(minimum=64)


def _local_data(cfg: RunConfig, partition: int, cid: str) -> tuple[ArrayDataset, ArrayDataset]:
    # The data layer caches the arrays; this skips its argument checks on every message.
    train_data, holdout = load_client_data(cfg, partition)
    if cid in cfg.backdoor_client_ids():
        train_data = _poisoned(train_data, cfg, cid)
    return train_data, holdout


@lru_cache(maxsize=8)
def _poisoned(data: ArrayDataset, cfg: RunConfig, cid: str) -> ArrayDataset:
    return poison(data, target_label=cfg.backdoor_target, fraction=cfg.backdoor_fraction,
                  seed=derive_seed(cfg.seed, "backdoor", cid))


@lru_cache(maxsize=64)
def _without(data: ArrayDataset, records: frozenset[str], labels: frozenset[int]
             ) -> ArrayDataset:
    return without(data, records=records, labels=labels)


def training_data(context: Context, train_data: ArrayDataset,
                  conf: ConfigRecord) -> ArrayDataset:
    """``train_data`` minus the records this client asked to forget and the labels the
    federation forgets (:mod:`fedforget.erasure`)."""
    return _without(train_data, client_records(state_dir_of(context)), labels_of(conf))


def _data_size(context: Context) -> int:
    """This client's number of training examples (told to the server at identify)."""
    return len(local_data(context)[0])


app = ClientApp(mods=[unlearning_mod_with(data_size=_data_size)])
"""The client mod reports this client's training data size at identify when the server asks
(the bound of a robust example-count cap)."""


@lru_cache(maxsize=4)
def _scratch_model(cfg: RunConfig) -> torch.nn.Module:
    """One model object per configuration, reused across messages (every parameter is
    overwritten from the received arrays, and optimisers are made per call)."""
    return new_model(cfg)


_R = TypeVar("_R", ArrayRecord, ConfigRecord)


def _record(msg: Message, key: str, kind: type[_R]) -> _R | None:
    """The record ``key`` of the message if it is a ``kind`` (without building the
    ``RecordDict.array_records`` & co. views, which copy the dict on every use)."""
    record = msg.content.get(key)
    return record if isinstance(record, kind) else None


def _received_model(msg: Message, cfg: RunConfig) -> torch.nn.Module:
    arrays = _record(msg, "arrays", ArrayRecord)
    if arrays is None:
        raise ClientReplyError("the message carries no ArrayRecord 'arrays'")
    return load_tensors(_scratch_model(cfg), from_array_record(arrays))


def _setting(conf: ConfigRecord, key: str, kind: type[int] | type[float]) -> int | float:
    value = conf.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"train config {key} = {value!r}: expected a number from the server")
    return kind(value)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data with the server's settings (or run
    the client-side procedure the config names)."""
    cfg = run_config_of(context)
    torch.set_num_threads(cfg.torch_threads)
    conf = _record(msg, protocol.CONFIG_RECORD, ConfigRecord) or ConfigRecord()
    all_train, holdout = local_data(context, cfg)
    train_data = training_data(context, all_train, conf)
    model = _received_model(msg, cfg)
    task = conf.get(protocol.TASK, TRAIN)
    started = time.perf_counter()
    metrics: dict[str, int | float | list[int] | list[float]]
    if task != TRAIN:
        procedure = CLIENT_TASKS.get(str(task))
        # a procedure that trains nothing may read the forgotten data (FUCP's activations)
        data = all_train if getattr(procedure, "sees_forgotten_data", False) else train_data
        metrics = dict(procedure(model, data, holdout, conf))
    else:
        result = train_local(
            model,
            train_data,
            epochs=int(_setting(conf, "local-epochs", int)),
            learning_rate=float(_setting(conf, "learning-rate", float)),
            batch_size=int(_setting(conf, "batch-size", int)),
            seed=int(_setting(conf, protocol.SEED, int)),
            proximal_mu=(float(_setting(conf, "proximal-mu", float))
                         if "proximal-mu" in conf else 0.0),
            momentum=float(_setting(conf, "momentum", float)) if "momentum" in conf else 0.0,
            weight_decay=(float(_setting(conf, "weight-decay", float))
                          if "weight-decay" in conf else 0.0),
        )
        metrics = {"num-examples": result.num_examples, "train-loss": result.loss}
    metrics["train-seconds"] = time.perf_counter() - started
    content = RecordDict({"arrays": model_array_record(model),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_holdout(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's held-out split."""
    cfg = run_config_of(context)
    torch.set_num_threads(cfg.torch_threads)
    _, holdout = local_data(context, cfg)
    result = evaluate(_received_model(msg, cfg), holdout)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": result.num_examples,
                    "accuracy": result.accuracy,
                    "loss": result.loss,
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)

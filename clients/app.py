"""fedforget's Flower ClientApp: local training and evaluation on one client's data.

Every reply carries the client's **stable id** in a ``ConfigRecord`` named ``client``
(key ``client-id``). The id comes from the node config key ``client-id`` when the operator
sets one (deployment), else from the partition: ``client-007`` for ``partition-id = 7``.
Flower's node ids are random per run and never used as identity.

The server sends everything that shapes local training in each train message:
``local-epochs``, ``learning-rate``, ``batch-size``, ``seed`` (the data order), and
``proximal-mu`` under FedProx.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedforget.config import RunConfig
from fedforget.data import ArrayDataset, poison
from fedforget.errors import ClientReplyError, ConfigError
from fedforget.sampling import derive_seed
from fedforget.task import (
    client_state_dir,
    from_array_record,
    load_client_data,
    load_tensors,
    model_array_record,
    new_model,
)
from fedforget.training import evaluate, train_local
from fedforget.unlearning import ascent

app = ClientApp()


def client_id_of(context: Context) -> str:
    """The stable, pseudonymous id of this client."""
    explicit = context.node_config.get("client-id")
    if explicit:
        return str(explicit)
    if "partition-id" not in context.node_config:
        raise ConfigError(
            "node config has neither 'client-id' nor 'partition-id'; expected e.g. "
            "--node-config \"partition-id=0 num-partitions=10\""
        )
    return f"client-{int(context.node_config['partition-id']):03d}"


@lru_cache(maxsize=4)
def _config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def run_config_of(context: Context) -> RunConfig:
    """The run configuration (parsed once per distinct config)."""
    return _config(tuple(sorted(context.run_config.items())))


def local_data(
    context: Context, cfg: RunConfig | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """This client's (train, held-out) data.

    With the experiment option ``backdoor-clients``, a listed client plants a backdoor:
    a seeded ``backdoor-fraction`` of its training examples carry the trigger and the label
    ``backdoor-target``.
    """
    return _local_data(
        cfg if cfg is not None else run_config_of(context),
        int(context.node_config.get("partition-id", 0)),
        client_id_of(context),
    )


@lru_cache(maxsize=256)
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


@lru_cache(maxsize=4)
def _scratch_model(cfg: RunConfig) -> torch.nn.Module:
    """One model object per configuration, reused across messages (every parameter is
    overwritten from the received arrays, and optimisers are made per call)."""
    return new_model(cfg)


def _record(msg: Message, key: str, kind: type[_R]) -> _R | None:
    """The record ``key`` of the message if it is a ``kind`` (without building the
    ``RecordDict.array_records`` & co. views, which copy the dict on every use)."""
    record = msg.content.get(key)
    return record if isinstance(record, kind) else None


_R = TypeVar("_R", ArrayRecord, ConfigRecord)


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


def state_dir(context: Context, cfg: RunConfig | None = None) -> Path:
    """This client's own state directory (node config ``state-dir``; in simulation a
    per-client folder of the run directory). ``cfg``: the run config, if already parsed."""
    explicit = context.node_config.get("state-dir")
    if explicit:
        return Path(str(explicit))
    cfg = cfg if cfg is not None else run_config_of(context)
    return client_state_dir(cfg.out_dir, client_id_of(context))


def _keep_tree_head(context: Context, conf: ConfigRecord, cfg: RunConfig) -> None:
    """Keep the latest signed tree head the server showed (``head.json``), so that a later
    erasure receipt can be checked to extend the history this client saw.

    The head is saved before the reply is sent, every time it grows. The first head goes
    to a new file (written to a temporary file and renamed into place); later ones
    overwrite it in place with one ``pwrite`` at offset 0 (see :func:`_save_head`).
    """
    head = conf.get("tree-head")
    if not isinstance(head, str) or not head:
        return
    size = int(json.loads(head).get("size", 0))
    path = _head_path(context.node_config.get("state-dir"), cfg.out_dir, client_id_of(context))
    saved = _saved_heads.get(path)
    if saved is None and path.exists():  # first time in this process
        saved = _saved_heads[path] = (
            int(json.loads(path.read_text()).get("size", 0)), path.stat().st_size
        )
    if saved is not None and saved[0] >= size:
        return
    data = head.encode()
    _save_head(path, data, saved_length=None if saved is None else saved[1])
    _saved_heads[path] = (size, len(data))


@lru_cache(maxsize=1024)
def _head_path(explicit_state_dir: object, out_dir: str, client_id: str) -> Path:
    """``state_dir(context) / "head.json"``, built once per client."""
    base = Path(str(explicit_state_dir)) if explicit_state_dir else client_state_dir(
        out_dir, client_id
    )
    return base / "head.json"


# A head is a few hundred bytes; a write of at most one page at offset 0 is never torn by
# a killed process (the kernel copies one page under the inode lock).
_PAGE = 4096


def _save_head(path: Path, data: bytes, *, saved_length: int | None) -> None:
    """Replace the content of ``path`` with ``data``, atomically for readers after a crash
    of the process.

    When ``path`` holds a head no longer than ``data`` (heads only grow: their ``size``
    field does), a single ``pwrite`` at offset 0 replaces all of it: no new inode, no
    rename, which on ext4 costs a flush of the file's data per rename (``auto_da_alloc``),
    i.e. milliseconds per client per round. Otherwise (first head, a shorter head, a file
    with other links or of another length than saved) it is written to a temporary file
    that is renamed over ``path``. Neither way is fsync'ed, as before: the head is a copy of
    what the server logs and can show again.
    """
    if saved_length is not None and saved_length <= len(data) <= _PAGE:
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            pass
        else:
            try:
                stat = os.fstat(fd)
                if (stat.st_nlink == 1 and stat.st_size == saved_length
                        and os.pwrite(fd, data, 0) == len(data)):
                    return
            finally:
                os.close(fd)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_saved_heads: dict[Path, tuple[int, int]] = {}
"""head.json path -> (tree size, file length) of the head this process saved there last."""


def _identity(context: Context) -> ConfigRecord:
    return ConfigRecord({"client-id": client_id_of(context)})


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Tell the server this client's stable id and how much data it holds."""
    train_data, _ = local_data(context)
    record = _identity(context)
    record["num-examples"] = len(train_data)
    return Message(content=RecordDict({"client": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data with the server's settings."""
    torch.set_num_threads(1)
    cfg = run_config_of(context)
    conf = _record(msg, "config", ConfigRecord) or ConfigRecord()
    train_data, _ = local_data(context, cfg)
    model = _received_model(msg, cfg)
    task = conf.get("task", "train")
    if task == ascent.TASK:
        return _projected_gradient_ascent(msg, context, model, conf, train_data)
    if task != "train":
        raise ConfigError(
            f"train config task = {task!r}; this client knows 'train' and {ascent.TASK!r}"
        )
    _keep_tree_head(context, conf, cfg)
    started = time.perf_counter()
    result = train_local(
        model,
        train_data,
        epochs=int(_setting(conf, "local-epochs", int)),
        learning_rate=float(_setting(conf, "learning-rate", float)),
        batch_size=int(_setting(conf, "batch-size", int)),
        seed=int(_setting(conf, "seed", int)),
        proximal_mu=float(_setting(conf, "proximal-mu", float)) if "proximal-mu" in conf else 0.0,
    )
    content = RecordDict(
        {
            "arrays": model_array_record(model),
            "metrics": MetricRecord(
                {
                    "num-examples": result.num_examples,
                    "train-loss": result.loss,
                    "train-seconds": time.perf_counter() - started,
                }
            ),
            "client": _identity(context),
        }
    )
    return Message(content=content, reply_to=msg)


def _projected_gradient_ascent(
    msg: Message, context: Context, model: torch.nn.Module, conf: ConfigRecord,
    train_data: ArrayDataset,
) -> Message:
    """PGA (Halimi et al., 2022): the leaving client ascends its loss near the reference.

    The message's arrays are the reference model (start and centre of the ball); the
    settings are in the train config (see :mod:`fedforget.unlearning.ascent`).
    """
    started = time.perf_counter()
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, holdout = local_data(context)
    result = ascent.projected_gradient_ascent(
        model, train_data, reference=reference, **ascent.ascent_kwargs(conf),
        validation=holdout if len(holdout) else None,  # the paper's early stop
    )
    metrics = MetricRecord(
        {**result.metrics(), "train-seconds": time.perf_counter() - started}
    )
    content = RecordDict(
        {"arrays": model_array_record(model), "metrics": metrics,
         "client": _identity(context)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_holdout(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's held-out split."""
    torch.set_num_threads(1)
    cfg = run_config_of(context)
    _, holdout = local_data(context)
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
            "client": _identity(context),
        }
    )
    return Message(content=content, reply_to=msg)

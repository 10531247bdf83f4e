"""The learning task of a run: its data, its model and the conversions the apps share.

Both Flower apps (``clients/`` and ``server/``) and, later, the unlearning methods build
the same model and read the same data from a :class:`~fedforget.config.RunConfig`; this
module is that single place.
"""

from __future__ import annotations

import re

import torch
from flwr.app.typing import ConfigRecordValues
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from fedforget.config import RunConfig
from fedforget.data import ArrayDataset, client_data, load_dataset
from fedforget.data.groups import group_of, mixed_test_set, shift_group
from fedforget.models import build_model
from fedforget.sampling import model_init_seed


def dataset_options(cfg: RunConfig) -> dict[str, object]:
    """Loader options for the configured data set."""
    if cfg.dataset == "synthetic":
        return {
            "num_samples": cfg.synthetic_samples,
            "num_features": cfg.synthetic_features,
            "num_classes": cfg.synthetic_classes,
        }
    return {}


def load_test_set(cfg: RunConfig) -> ArrayDataset:
    """The global test set (server-side evaluation); with client groups, each example in
    the accent of a group drawn by the groups' sizes (:mod:`fedforget.data.groups`)."""
    test = load_plain_test_set(cfg)
    if cfg.groups:
        return mixed_test_set(test, cfg.group_sizes(), cfg.group_shift, cfg.seed)
    return test


def load_plain_test_set(cfg: RunConfig) -> ArrayDataset:
    """The global test set as the data set gives it (no group's accent)."""
    _, test = load_dataset(
        cfg.dataset,
        seed=cfg.seed,
        data_path=cfg.data_path or None,
        test_fraction=cfg.test_fraction,
        **dataset_options(cfg),
    )
    return test


def client_group(cfg: RunConfig, partition_id: int) -> int:
    """The group of a client (0 without groups)."""
    return group_of(partition_id, cfg.group_sizes()) if cfg.groups else 0


def load_client_data(cfg: RunConfig, partition_id: int) -> tuple[ArrayDataset, ArrayDataset]:
    """One client's (local train, local held-out) data (in its group's accent)."""
    train, holdout = _client_data(cfg, partition_id)
    if not cfg.groups:
        return train, holdout
    group = client_group(cfg, partition_id)
    return (shift_group(train, group, cfg.group_shift, cfg.seed),
            shift_group(holdout, group, cfg.group_shift, cfg.seed))


def _client_data(cfg: RunConfig, partition_id: int) -> tuple[ArrayDataset, ArrayDataset]:
    return client_data(
        cfg.dataset,
        partition_id=partition_id,
        num_partitions=cfg.num_clients,
        partitioner=cfg.partitioner,
        seed=cfg.seed,
        alpha=cfg.dirichlet_alpha,
        shards_per_partition=cfg.shards_per_client,
        holdout_fraction=cfg.holdout_fraction,
        test_fraction=cfg.test_fraction,
        data_path=cfg.data_path or None,
        **dataset_options(cfg),  # type: ignore[arg-type]
    )


def new_model(cfg: RunConfig) -> torch.nn.Module:
    """The configured model, initialised from the run seed."""
    test = load_test_set(cfg)
    options = {"hidden_size": cfg.hidden_size} if cfg.model == "mlp" else {}
    return build_model(
        cfg.model,
        input_shape=test.input_shape,
        num_classes=test.num_classes,
        seed=model_init_seed(cfg.seed),
        **options,
    )


def build_strategy(cfg: RunConfig) -> Strategy:
    """The run's aggregation strategy (FedAvg or FedProx; clients are sampled by fedforget)."""
    if cfg.strategy == "fedprox":
        return FedProx(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                       min_evaluate_nodes=1, min_available_nodes=1, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedmedian":  # robust: the coordinate-wise median of the updates
        return FedMedian(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                         min_evaluate_nodes=1, min_available_nodes=1)
    if cfg.strategy == "fedtrimmedavg":  # robust: the mean without the extreme beta
        return FedTrimmedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                             min_evaluate_nodes=1, min_available_nodes=1,
                             beta=cfg.trim_beta)
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1)


def train_config(cfg: RunConfig) -> dict[str, ConfigRecordValues]:
    """The local-training settings the server sends every round."""
    return {"local-epochs": cfg.local_epochs, "learning-rate": cfg.learning_rate,
            "batch-size": cfg.batch_size}


def client_partition(client_id: str) -> int | None:
    """The partition of fedforget's default client id ``client-%03d`` (None for another id)."""
    match = re.fullmatch(r"client-(\d+)", client_id)
    return int(match.group(1)) if match else None


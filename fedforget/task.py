"""The learning task of a run: its data, its model and the conversions the apps share.

Both Flower apps (``clients/`` and ``server/``) and, later, the unlearning methods build
the same model and read the same data from a :class:`~fedforget.config.RunConfig`; this
module is that single place.
"""

from __future__ import annotations

import re

import numpy as np
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
    """The global test set (server-side evaluation): with client groups, each example in
    the accent of a group drawn by the groups' sizes (:mod:`fedforget.data.groups`); without
    the proxy set (:func:`load_proxy_set`) when ``proxy-fraction`` > 0; standardised with
    ``normalize-mean`` / ``normalize-std``."""
    test = _full_test_set(cfg)
    if cfg.proxy_fraction <= 0:
        return _normalised(cfg, test)
    return _normalised(cfg, test.subset(
        np.sort(_proxy_order(cfg, len(test))[_proxy_size(cfg, len(test)):]), name=test.name))


def load_proxy_set(cfg: RunConfig) -> ArrayDataset | None:
    """The server's proxy data: ``proxy-fraction`` of the global test split, chosen by a
    permutation seeded from the run seed (``derive_seed(seed, "proxy-set")``); None when
    ``proxy-fraction`` is 0. Its examples are not in :func:`load_test_set`."""
    if cfg.proxy_fraction <= 0:
        return None
    test = _full_test_set(cfg)
    size = _proxy_size(cfg, len(test))
    return _normalised(cfg, test.subset(np.sort(_proxy_order(cfg, len(test))[:size]),
                                        name=f"{test.name}/proxy"))


def _full_test_set(cfg: RunConfig) -> ArrayDataset:
    test = load_plain_test_set(cfg)
    if cfg.groups:
        return mixed_test_set(test, cfg.group_sizes(), cfg.group_shift, cfg.seed)
    return test


def load_plain_test_set(cfg: RunConfig) -> ArrayDataset:
    """The global test set as the data set gives it (no group's accent, no proxy carved
    out, not standardised)."""
    _, test = load_dataset(
        cfg.dataset,
        seed=cfg.seed,
        data_path=cfg.data_path or None,
        test_fraction=cfg.test_fraction,
        **dataset_options(cfg),
    )
    return test


def _proxy_size(cfg: RunConfig, n: int) -> int:
    return min(max(1, int(cfg.proxy_fraction * n)), n - 1)


def _proxy_order(cfg: RunConfig, n: int) -> np.ndarray:
    from fedforget.sampling import derive_seed

    return np.random.default_rng(derive_seed(cfg.seed, "proxy-set")).permutation(n)


def client_group(cfg: RunConfig, partition_id: int) -> int:
    """The group of a client (0 without groups)."""
    return group_of(partition_id, cfg.group_sizes()) if cfg.groups else 0


def load_client_data(cfg: RunConfig, partition_id: int) -> tuple[ArrayDataset, ArrayDataset]:
    """One client's (local train, local held-out) data (in its group's accent).

    With ``client-pool`` P > ``num-clients`` N the train pool is split into P partitions and
    the run's clients are N of them drawn once (:func:`pool_partitions`); with
    ``examples-per-client`` the training split keeps that many examples (a seeded subset);
    ``normalize-mean`` / ``normalize-std`` standardise the inputs (after the group's accent).
    """
    pool = cfg.client_pool if cfg.client_pool > cfg.num_clients else cfg.num_clients
    partition = (pool_partitions(cfg)[partition_id]
                 if pool != cfg.num_clients and 0 <= partition_id < cfg.num_clients
                 else partition_id)
    train, held = _client_data(cfg, partition, pool)
    if cfg.examples_per_client and len(train) > cfg.examples_per_client:
        from fedforget.sampling import derive_seed

        rng = np.random.default_rng(derive_seed(cfg.seed, "examples-per-client", partition))
        train = train.subset(np.sort(rng.permutation(len(train))[:cfg.examples_per_client]),
                             name=train.name)
    if cfg.groups:
        group = client_group(cfg, partition_id)
        train = shift_group(train, group, cfg.group_shift, cfg.seed)
        held = shift_group(held, group, cfg.group_shift, cfg.seed)
    return _normalised(cfg, train), _normalised(cfg, held)


def pool_partitions(cfg: RunConfig) -> list[int]:
    """The ``num-clients`` partitions of the ``client-pool`` the run's clients are, drawn
    once with ``derive_seed(seed, "client-pool")``, in ascending order (client k is the
    k-th)."""
    from fedforget.sampling import derive_seed

    rng = np.random.default_rng(derive_seed(cfg.seed, "client-pool"))
    return sorted(int(i) for i in rng.choice(cfg.client_pool, cfg.num_clients, replace=False))


def _normalised(cfg: RunConfig, data: ArrayDataset) -> ArrayDataset:
    if cfg.normalize_mean == 0.0 and cfg.normalize_std == 1.0:
        return data
    x = ((np.asarray(data.x, np.float32) - np.float32(cfg.normalize_mean))
         / np.float32(cfg.normalize_std))
    return ArrayDataset(x=x, y=data.y, num_classes=data.num_classes, name=data.name)


def _client_data(cfg: RunConfig, partition_id: int, num_partitions: int | None = None
                 ) -> tuple[ArrayDataset, ArrayDataset]:
    return client_data(
        cfg.dataset,
        partition_id=partition_id,
        num_partitions=num_partitions or cfg.num_clients,
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
    """The local-training settings the server sends every round (``momentum`` and
    ``weight-decay`` only when set, so that a run without them sends what it always did)."""
    out: dict[str, ConfigRecordValues] = {"local-epochs": cfg.local_epochs,
                                          "learning-rate": cfg.learning_rate,
                                          "batch-size": cfg.batch_size}
    if cfg.momentum:
        out["momentum"] = cfg.momentum
    if cfg.weight_decay:
        out["weight-decay"] = cfg.weight_decay
    return out


def client_partition(client_id: str) -> int | None:
    """The partition of fedforget's default client id ``client-%03d`` (None for another id)."""
    match = re.fullmatch(r"client-(\d+)", client_id)
    return int(match.group(1)) if match else None


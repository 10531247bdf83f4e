"""Run-config keys of paper protocols: client pool, examples per client, normalisation,
momentum and weight decay on the wire, proxy set."""

from __future__ import annotations

import numpy as np
import pytest

from fedforget.config import RunConfig
from fedforget.data import client_data
from fedforget.errors import ConfigError
from fedforget.task import (
    load_client_data,
    load_proxy_set,
    load_test_set,
    pool_partitions,
    train_config,
)

BASE = {"dataset": "synthetic", "synthetic-samples": 400, "partitioner": "iid", "seed": 3}


def test_clients_drawn_once_from_a_pool() -> None:
    cfg = RunConfig.from_mapping({**BASE, "num-clients": 4, "client-pool": 10})
    chosen = pool_partitions(cfg)
    assert chosen == sorted(chosen) and len(set(chosen)) == 4 and max(chosen) < 10
    assert pool_partitions(cfg) == chosen  # drawn once: the same every time
    train, _ = load_client_data(cfg, 2)
    expected, _ = client_data("synthetic", partition_id=chosen[2], num_partitions=10,
                              partitioner="iid", seed=3, num_samples=400, num_features=20,
                              num_classes=4)
    np.testing.assert_array_equal(train.x, expected.x)
    with pytest.raises(ConfigError, match="client-pool = 3 is smaller than num-clients = 4"):
        RunConfig.from_mapping({**BASE, "num-clients": 4, "client-pool": 3})


def test_examples_per_client_and_normalisation() -> None:
    plain = RunConfig.from_mapping({**BASE, "num-clients": 2})
    cut = plain.replace(examples_per_client=25)
    scaled = plain.replace(normalize_mean=0.5, normalize_std=2.0)
    full, held = load_client_data(plain, 1)
    few, held_few = load_client_data(cut, 1)
    assert len(few) == 25 and len(full) > 25
    rows = {tuple(r) for r in full.x.tolist()}
    assert all(tuple(r) in rows for r in few.x.tolist())  # a subset of the client's examples
    np.testing.assert_array_equal(held_few.x, held.x)  # the held-out split is kept whole
    norm, _ = load_client_data(scaled, 1)
    np.testing.assert_allclose(norm.x, (full.x - 0.5) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(load_test_set(scaled).x, (load_test_set(plain).x - 0.5) / 2.0,
                               rtol=1e-6)


def test_proxy_set_is_carved_out_of_the_test_split() -> None:
    plain = RunConfig.from_mapping(BASE)
    carved = plain.replace(proxy_fraction=0.25)
    whole, test, proxy = load_test_set(plain), load_test_set(carved), load_proxy_set(carved)
    assert proxy is not None and load_proxy_set(plain) is None
    assert len(proxy) == int(0.25 * len(whole)) and len(test) + len(proxy) == len(whole)
    rows = lambda d: {tuple(r) for r in d.x.tolist()}  # noqa: E731
    assert rows(test) | rows(proxy) == rows(whole) and not rows(test) & rows(proxy)


def test_momentum_and_weight_decay_go_on_the_wire_only_when_set() -> None:
    plain = RunConfig.from_mapping(BASE)
    assert set(train_config(plain)) == {"local-epochs", "learning-rate", "batch-size"}
    sent = train_config(plain.replace(momentum=0.9, weight_decay=5e-4))
    assert sent["momentum"] == 0.9 and sent["weight-decay"] == 5e-4
    with pytest.raises(ConfigError, match=r"momentum = 1.0 is out of range"):
        RunConfig.from_mapping({"momentum": 1.0})
    with pytest.raises(ConfigError, match=r"torch-threads = 0 is out of range"):
        RunConfig.from_mapping({"torch-threads": 0})

"""Client groups with a per-group input shift (an "accent")."""

from __future__ import annotations

import numpy as np
import pytest

from fedforget.config import RunConfig
from fedforget.data import ArrayDataset
from fedforget.data.groups import group_of, mixed_test_set, parse_groups, shift_group
from fedforget.errors import ConfigError
from fedforget.task import load_client_data, load_plain_test_set, load_test_set


def test_groups_are_contiguous_runs_of_clients() -> None:
    sizes = parse_groups("3,2", 5)
    assert [group_of(p, sizes) for p in range(5)] == [0, 0, 0, 1, 1]
    assert parse_groups("", 5) == ()
    with pytest.raises(ConfigError, match="adds up to 4 clients; expected num-clients = 5"):
        parse_groups("2,2", 5)
    with pytest.raises(ConfigError, match="expected positive group sizes"):
        RunConfig.from_mapping({"num-clients": 2, "groups": "2,x"})


def test_a_group_sees_a_fixed_permutation_of_the_same_examples() -> None:
    data = ArrayDataset(x=np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3),
                        y=np.array([0, 1, 0, 1]), num_classes=2, name="d",
                        ids=np.array([5, 6, 7, 8]))
    assert shift_group(data, 0, "permute", 1) is data
    shifted = shift_group(data, 1, "permute", 1)
    # the same pixels in another order, the same labels and record ids
    assert np.array_equal(np.sort(shifted.x.reshape(4, -1), axis=1),
                          np.sort(data.x.reshape(4, -1), axis=1))
    assert not np.array_equal(shifted.x, data.x)
    order = [int(np.flatnonzero(data.x.reshape(4, -1)[0] == v)[0])
             for v in shifted.x.reshape(4, -1)[0]]
    for i in range(4):  # one permutation for every example of the group
        assert np.array_equal(shifted.x.reshape(4, -1)[i], data.x.reshape(4, -1)[i][order])
    assert shifted.ids.tolist() == [5, 6, 7, 8] and shifted.y.tolist() == [0, 1, 0, 1]
    assert np.array_equal(shift_group(data, 1, "invert", 0).x, 1.0 - data.x)


def test_a_grouped_run_shifts_its_clients_and_mixes_its_test_set() -> None:
    cfg = RunConfig.from_mapping({"num-clients": 4, "groups": "3,1", "dataset": "digits"})
    plain = RunConfig.from_mapping({"num-clients": 4, "dataset": "digits"})
    same, _ = load_client_data(cfg, 0)
    moved, _ = load_client_data(cfg, 3)
    assert np.array_equal(same.x, load_client_data(plain, 0)[0].x)
    assert not np.array_equal(moved.x, load_client_data(plain, 3)[0].x)
    assert np.array_equal(moved.ids, load_client_data(plain, 3)[0].ids)
    mixed, test = load_test_set(cfg), load_plain_test_set(cfg)
    changed = (mixed.x != test.x).reshape(len(test), -1).any(axis=1).mean()
    assert 0.1 < changed < 0.4  # about a quarter of the test set in group 1's accent
    assert mixed_test_set(test, (), "permute", 0) is test

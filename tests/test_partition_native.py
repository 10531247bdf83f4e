"""IID and Dirichlet partitions computed with NumPy equal Flower Datasets' partitions."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fedforget.data.partition import _flower_partition, partition_indices


@pytest.mark.parametrize(("n", "k", "seed"), [(10, 3, 0), (101, 7, 5), (400, 4, 7),
                                               (1000, 1000, 2)])
def test_iid_without_datasets_equals_flower_datasets(n: int, k: int, seed: int) -> None:
    # Prepare
    labels = np.arange(n) % 4
    # Execute
    ours = partition_indices(labels, num_partitions=k, partitioner="iid", seed=seed)
    flowers = _flower_partition(labels, num_partitions=k, partitioner="iid", seed=seed,
                                alpha=0.5, shards_per_partition=2, min_partition_size=1,
                                self_balancing=False)
    # Assert: the same sorted index arrays; sizes differ by at most one, larger first
    assert len(ours) == len(flowers) == k
    for a, b in zip(ours, flowers, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int64
    sizes = [len(p) for p in ours]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    assert sorted(np.concatenate(ours).tolist()) == list(range(n))


def test_iid_and_dirichlet_do_not_import_datasets() -> None:
    import subprocess

    code = ("import sys, numpy as np\n"
            "from fedforget.data.partition import partition_indices\n"
            "partition_indices(np.arange(50) % 3, num_partitions=5, partitioner='iid', seed=1)\n"
            "partition_indices(np.arange(50) % 3, num_partitions=5, partitioner='dirichlet',"
            " seed=1, alpha=0.5)\n"
            "print('datasets' in sys.modules, 'pyarrow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(("n", "k", "alpha", "seed", "min_size", "balancing"), [
    (120, 4, 0.5, 0, 2, False), (1000, 10, 0.1, 3, 10, False), (1000, 10, 0.3, 3, 5, True),
    (500, 50, 5.0, 7, 1, False), (2000, 7, 1.0, 11, 30, True)])
def test_dirichlet_without_datasets_equals_flower_datasets(
        n: int, k: int, alpha: float, seed: int, min_size: int, balancing: bool) -> None:
    labels = np.random.default_rng(seed + 1).integers(0, 6, size=n)
    ours = partition_indices(labels, num_partitions=k, partitioner="dirichlet", seed=seed,
                             alpha=alpha, min_partition_size=min_size,
                             self_balancing=balancing)
    flowers = _flower_partition(labels, num_partitions=k, partitioner="dirichlet", seed=seed,
                                alpha=alpha, shards_per_partition=2,
                                min_partition_size=min_size, self_balancing=balancing)
    for a, b in zip(ours, flowers, strict=True):
        np.testing.assert_array_equal(a, b)
    assert min(len(p) for p in ours) >= min_size


def test_an_infeasible_dirichlet_is_refused_like_flower_datasets() -> None:
    from fedforget.errors import DataError

    labels = np.arange(40) % 4
    with pytest.raises(DataError, match="The max number of attempts"):
        partition_indices(labels, num_partitions=10, partitioner="dirichlet", seed=0,
                          alpha=0.01, min_partition_size=4)
    with pytest.raises(DataError, match="The max number of attempts"):
        _flower_partition(labels, num_partitions=10, partitioner="dirichlet", seed=0,
                          alpha=0.01, shards_per_partition=2, min_partition_size=4,
                          self_balancing=False)

r"""Split the train pool among clients with Flower Datasets' partitioners.

The partitioners of ``flwr-datasets`` run on an in-memory ``datasets.Dataset`` of two
columns, ``label`` and ``index`` (the position in the train pool), so no hub access is
needed and the result is plain index arrays.

- ``"iid"``: a seeded shuffle cut into ``num_partitions`` near-equal parts
  (:class:`~flwr_datasets.partitioner.IidPartitioner`).
- ``"dirichlet"``: for each class :math:`c`, proportions
  :math:`p_c \sim \mathrm{Dir}_K(\alpha)` over the :math:`K` clients (Hsu et al., 2019,
  https://arxiv.org/abs/1909.06335); the draw is repeated until every client has
  ``min_partition_size`` examples (:class:`~flwr_datasets.partitioner.DirichletPartitioner`).
- ``"shard"``: the pool sorted by label is cut into ``K * shards_per_partition`` shards of
  :math:`\lfloor N / (K s) \rfloor` examples and each client gets ``s`` random shards
  (McMahan et al., 2017, https://arxiv.org/abs/1602.05629); the remainder of fewer than
  :math:`K s` examples is left out (:class:`~flwr_datasets.partitioner.ShardPartitioner`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np

from fedforget.cache import FederationCache
from fedforget.data.array_dataset import ArrayDataset, check_fraction
from fedforget.data.datasets import load_dataset
from fedforget.errors import ConfigError, DataError

PARTITIONERS = ("iid", "dirichlet", "shard")


def partition_indices(
    labels: np.ndarray,
    *,
    num_partitions: int,
    partitioner: str,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_partition_size: int | None = None,
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """Assign the examples of a train pool to ``num_partitions`` clients.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the train pool, shape ``(N,)``.
    num_partitions : int
        Number of clients ``K``, ``1 <= K <= N``.
    partitioner : str
        One of :data:`PARTITIONERS`.
    seed : int
        Seed of the assignment; the same seed gives the same partitions.
    alpha : float
        Dirichlet concentration (run-config key ``dirichlet-alpha``), ``> 0``; smaller is
        more heterogeneous. Used by ``"dirichlet"`` only.
    shards_per_partition : int
        Shards per client (run-config key ``shards-per-client``). Used by ``"shard"`` only.
    min_partition_size : int, optional
        Smallest client size the Dirichlet draw must reach. Default: 10, lowered to
        ``max(1, N // (10 K))`` (a tenth of the mean size) when the clients are small.
    self_balancing : bool
        Flower's Dirichlet option that stops giving examples to clients already above the
        mean size; off by default, which keeps the label skew that ``alpha`` asks for.

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` index array per client, pairwise disjoint. They cover the
        whole pool for ``"iid"`` and ``"dirichlet"``; ``"shard"`` leaves out the remainder.

    Raises
    ------
    ConfigError
        A value out of range (the message names the key and what is allowed).
    DataError
        The Dirichlet draw could not give every client ``min_partition_size`` examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels of dtype {labels.dtype} and shape {labels.shape}; expected integers of "
            "shape (N,)"
        )
    n = int(labels.shape[0])
    _check_partition_args(
        n,
        num_partitions=num_partitions,
        partitioner=partitioner,
        seed=seed,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
        min_partition_size=min_partition_size,
    )
    if min_partition_size is None:
        min_partition_size = min(10, max(1, n // (10 * num_partitions)))
    # IID and Dirichlet are computed here, as Flower Datasets computes them (tests check
    # the partitions are the same), without importing ``flwr_datasets``, whose package
    # loads datasets, pyarrow, pandas, matplotlib, seaborn and scipy (some 200 MB and
    # seconds of every process that partitions: each simulated client's).
    if partitioner == "iid":
        # IidPartitioner's contiguous shards of the shuffled rows (``Dataset.shard``: the
        # first N mod K parts one longer)
        order = np.random.default_rng(seed).permutation(n).astype(np.int64)
        return [np.sort(p) for p in np.array_split(order, num_partitions)]
    if partitioner == "dirichlet":
        return _dirichlet(labels, num_partitions=num_partitions, alpha=alpha, seed=seed,
                          min_partition_size=min_partition_size,
                          self_balancing=self_balancing)
    return _flower_partition(labels, num_partitions=num_partitions, partitioner=partitioner,
                             seed=seed, alpha=alpha, shards_per_partition=shards_per_partition,
                             min_partition_size=min_partition_size,
                             self_balancing=self_balancing)


def _dirichlet(labels: np.ndarray, *, num_partitions: int, alpha: float, seed: int,
               min_partition_size: int, self_balancing: bool) -> list[np.ndarray]:
    """DirichletPartitioner's assignment (``shuffle=False``), step for step: for each class
    in ascending order, proportions :math:`p \\sim \\mathrm{Dir}_K(\alpha)` from one
    generator seeded with ``seed`` (with self-balancing, clients already above the mean
    size get 0 and the rest are renormalised), the class's indices cut at
    ``int(cumsum(p) * n_c)``; the whole draw repeated until every client has
    ``min_partition_size`` examples, at most 11 times."""
    rng = np.random.default_rng(seed)
    concentration = np.array([float(alpha)], dtype=float).repeat(num_partitions)
    average = labels.shape[0] / num_partitions
    classes = sorted(int(c) for c in np.unique(labels))
    for attempt in range(11):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for k in classes:
            members = np.nonzero(labels == k)[0]
            proportions = list(rng.dirichlet(concentration))
            if self_balancing:
                proportions = [0 if len(parts[i]) > average else p
                               for i, p in enumerate(proportions)]
                total = sum(proportions)
                proportions = [p / total for p in proportions]
            cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
            for i, piece in enumerate(np.split(members, cuts)):
                parts[i].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_partition_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
        if attempt == 10:
            break
    raise DataError(
        f"dirichlet partitioning of {labels.shape[0]} examples into {num_partitions} clients "
        f"failed (dirichlet-alpha = {alpha}, min-partition-size = {min_partition_size}): "
        "The max number of attempts (10) was reached. Please update the values of alpha "
        "and try again. Expected a feasible setting: raise dirichlet-alpha, lower "
        "min-partition-size or use fewer clients."
    )


def _flower_partition(labels: np.ndarray, *, num_partitions: int, partitioner: str, seed: int,
                      alpha: float, shards_per_partition: int, min_partition_size: int,
                      self_balancing: bool) -> list[np.ndarray]:
    """The partition by one of Flower Datasets' partitioners (see
    :func:`partition_indices`)."""
    n = int(labels.shape[0])
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        ShardPartitioner,
    )

    # IidPartitioner cuts contiguous blocks: shuffle the rows first.
    order = np.random.default_rng(seed).permutation(n) if partitioner == "iid" else np.arange(n)
    table = datasets.Dataset.from_dict(
        {"label": labels[order].astype(np.int64), "index": order.astype(np.int64)}
    )
    engine: Partitioner
    if partitioner == "iid":
        engine = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        engine = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=self_balancing,
            shuffle=False,
            seed=seed,
        )
    else:
        engine = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=shards_per_partition,
            shuffle=False,
            seed=seed,
        )
    engine.dataset = table
    try:
        with warnings.catch_warnings():
            # Flower warns on each Dirichlet re-draw, pyarrow on a deprecated sort option.
            warnings.simplefilter("ignore")
            parts = [
                np.asarray(engine.load_partition(i)["index"], dtype=np.int64)
                for i in range(num_partitions)
            ]
    except ValueError as exc:
        raise DataError(
            f"{partitioner} partitioning of {n} examples into {num_partitions} clients "
            f"failed (dirichlet-alpha = {alpha}, min-partition-size = {min_partition_size}): "
            f"{exc} Expected a feasible setting: raise dirichlet-alpha, lower "
            "min-partition-size or use fewer clients."
        ) from None
    return [np.sort(p) for p in parts]


def client_split(
    indices: np.ndarray, *, holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into local train and held-out parts.

    ``round(n * holdout_fraction)`` indices (rounding half up, at most ``n - 1``) chosen by
    a seeded permutation are held out; both parts come back sorted.

    Parameters
    ----------
    indices : numpy.ndarray
        The client's indices into the train pool.
    holdout_fraction : float
        In ``[0, 1)``; 0 gives an empty held-out part.
    seed : int
        Seed of the permutation.
    """
    check_fraction("holdout-fraction", holdout_fraction, low_open=False)
    indices = np.asarray(indices, dtype=np.int64)
    n = int(indices.shape[0])
    n_holdout = min(int(n * holdout_fraction + 0.5), max(n - 1, 0))
    shuffled = indices[np.random.default_rng(seed).permutation(n)]
    return np.sort(shuffled[n_holdout:]), np.sort(shuffled[:n_holdout])


def client_data(
    name: str,
    *,
    partition_id: int,
    num_partitions: int,
    partitioner: str,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_partition_size: int | None = None,
    holdout_fraction: float = 0.2,
    data_path: str | None = None,
    test_fraction: float = 0.2,
    **options: Any,
) -> tuple[ArrayDataset, ArrayDataset]:
    """The local train and held-out data of client ``partition_id`` (cached).

    Loads data set ``name`` (:func:`~fedforget.data.datasets.load_dataset`), partitions its
    train pool (:func:`partition_indices`) and splits the client's part
    (:func:`client_split`, with a seed derived from ``seed`` and ``partition_id``).

    Parameters
    ----------
    name : str
        Data set name.
    partition_id : int
        The client, ``0 <= partition_id < num_partitions``.
    num_partitions, partitioner, seed, alpha, shards_per_partition, min_partition_size
        As in :func:`partition_indices`; ``seed`` also drives the data set split.
    holdout_fraction : float
        As in :func:`client_split`.
    data_path, test_fraction, **options
        As in :func:`~fedforget.data.datasets.load_dataset`.

    Returns
    -------
    (ArrayDataset, ArrayDataset)
        The client's train data (named ``"<name>/client-<id>"``) and held-out data.
    """
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, int)
        or not 0 <= partition_id < num_partitions
    ):
        raise ConfigError(
            f"partition-id = {partition_id!r} is out of range; expected an integer in "
            f"0..{num_partitions - 1} (num-partitions = {num_partitions})"
        )
    check_fraction("holdout-fraction", holdout_fraction, low_open=False)
    pool, _ = load_dataset(
        name, seed=seed, data_path=data_path, test_fraction=test_fraction, **options
    )
    args = (pool, partition_id, num_partitions, partitioner, seed, alpha,
            shards_per_partition, min_partition_size, holdout_fraction)
    # Every client of the federation (and of one more, e.g. the previous run of a grid)
    # stays cached: a round of a large federation re-derives nothing.
    return _CLIENT_DATA.get(args, lambda: _client_data(*args), capacity=2 * num_partitions)


_CLIENT_DATA: FederationCache[tuple[ArrayDataset, ArrayDataset]] = FederationCache(minimum=64)


def _client_data(
    pool: ArrayDataset,
    partition_id: int,
    num_partitions: int,
    partitioner: str,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int | None,
    holdout_fraction: float,
) -> tuple[ArrayDataset, ArrayDataset]:
    # ``pool`` is the cached object of load_dataset, hashed by identity.
    parts = _partitions_cached(
        pool, num_partitions, partitioner, seed, alpha, shards_per_partition, min_partition_size
    )
    train_idx, holdout_idx = client_split(
        parts[partition_id],
        holdout_fraction=holdout_fraction,
        seed=_client_seed(seed, partition_id),
    )
    base = pool.name
    return (
        pool.subset(train_idx, name=f"{base}/client-{partition_id}"),
        pool.subset(holdout_idx, name=f"{base}/client-{partition_id}/holdout"),
    )


@functools.lru_cache(maxsize=16)
def _partitions_cached(
    pool: ArrayDataset,
    num_partitions: int,
    partitioner: str,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int | None,
) -> tuple[np.ndarray, ...]:
    parts = partition_indices(
        pool.y,
        num_partitions=num_partitions,
        partitioner=partitioner,
        seed=seed,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
        min_partition_size=min_partition_size,
    )
    for part in parts:
        part.flags.writeable = False
    return tuple(parts)


def _client_seed(seed: int, partition_id: int) -> int:
    """A seed for client ``partition_id``'s own split, independent of the other clients'."""
    state = np.random.SeedSequence([seed, partition_id]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _check_partition_args(
    n: int,
    *,
    num_partitions: int,
    partitioner: str,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int | None,
) -> None:
    if partitioner not in PARTITIONERS:
        allowed = ", ".join(repr(p) for p in PARTITIONERS)
        raise ConfigError(
            f"partitioner = {partitioner!r} is not allowed; expected one of {allowed}"
        )
    if not _is_int(num_partitions) or not 1 <= num_partitions <= n:
        raise ConfigError(
            f"num-partitions = {num_partitions!r} is out of range; expected an integer in "
            f"1..{n} (the size of the train pool)"
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed = {seed!r} is out of range; expected an integer >= 0")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet-alpha = {alpha!r} is out of range; expected a number > 0")
    if not _is_int(shards_per_partition) or shards_per_partition < 1:
        raise ConfigError(
            f"shards-per-client = {shards_per_partition!r} is out of range; expected an "
            "integer >= 1"
        )
    if partitioner == "shard" and num_partitions * shards_per_partition > n:
        raise ConfigError(
            f"shards-per-client = {shards_per_partition} with num-partitions = "
            f"{num_partitions} asks for {num_partitions * shards_per_partition} shards of "
            f"{n} examples; expected num-partitions * shards-per-client <= {n}"
        )
    if min_partition_size is not None and (
        not _is_int(min_partition_size) or min_partition_size < 0
    ):
        raise ConfigError(
            f"min-partition-size = {min_partition_size!r} is out of range; expected an "
            "integer >= 0"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)

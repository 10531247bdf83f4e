"""The registry of data sets by name, and the cached :func:`load_dataset`.

A new data set is one module with a loader and one ``DATASETS.register`` line (see
:mod:`fedforget.registry`). A loader takes
keyword-only ``seed``, ``data_path``, ``test_fraction`` and its own options, and returns
``(train pool, global test set)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any

from fedforget.data.array_dataset import ArrayDataset, check_fraction
from fedforget.data.digits import load_digits
from fedforget.data.fashion_mnist import load_fashion_mnist
from fedforget.data.synthetic import load_synthetic
from fedforget.errors import ConfigError
from fedforget.registry import Registry

DatasetLoader = Callable[..., tuple[ArrayDataset, ArrayDataset]]
"""``loader(*, seed, data_path, test_fraction, **options) -> (train pool, global test set)``."""


DATASETS: Registry[DatasetLoader] = Registry("data set")
DATASETS.register("digits", load_digits)
DATASETS.register("fashion-mnist", load_fashion_mnist)
DATASETS.register("synthetic", load_synthetic)

_COMMON = frozenset({"seed", "data_path", "test_fraction"})


def dataset_options(name: str) -> tuple[str, ...]:
    """The options (beyond seed, data_path, test_fraction) that data set ``name`` accepts."""
    loader = _loader(name)
    return tuple(p for p in inspect.signature(loader).parameters if p not in _COMMON)


def load_dataset(
    name: str,
    *,
    seed: int,
    data_path: str | None = None,
    test_fraction: float = 0.2,
    **options: Any,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load data set ``name`` as ``(train pool, global test set)``.

    Results are cached per argument values: every simulated client of a process calls this,
    and the arrays are read-only, so sharing them is safe.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    seed : int
        Seed of the train/test split (and of the data, for generated sets).
    data_path : str, optional
        Where files are read from, for data sets that need files; ``""`` means the default.
    test_fraction : float
        Fraction held out as the global test set, for data sets without a fixed split.
    **options
        Options of that data set (see :func:`dataset_options`).

    Raises
    ------
    ConfigError
        Unknown name or option, or a value out of range.
    DataError
        The data could not be read.
    """
    allowed = dataset_options(name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed = {seed!r} is out of range; expected an integer >= 0")
    check_fraction("test-fraction", test_fraction, low_open=True)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"data set {name!r} has no option {unknown[0]!r}; allowed options: "
            f"{', '.join(allowed) if allowed else '(none)'}"
        )
    for key, value in options.items():
        if not isinstance(value, Hashable):
            raise ConfigError(
                f"option {key} = {value!r} of data set {name!r}: expected a scalar value"
            )
    cache_key = tuple(sorted(options.items()))
    return _load_cached(name, seed, data_path or None, test_fraction, cache_key)


@functools.lru_cache(maxsize=16)
def _load_cached(
    name: str,
    seed: int,
    data_path: str | None,
    test_fraction: float,
    options: tuple[tuple[str, Any], ...],
) -> tuple[ArrayDataset, ArrayDataset]:
    loader = _loader(name)
    return loader(seed=seed, data_path=data_path, test_fraction=test_fraction, **dict(options))


def _loader(name: str) -> DatasetLoader:
    return DATASETS.get(name)

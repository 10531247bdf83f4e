r"""Clients in groups that differ in a way the model must learn (an "accent").

With the run-config key ``groups = "7,3"`` the clients come in groups, in client order
(``client-000`` .. ``client-006`` in group 0, ``client-007`` .. ``client-009`` in group 1).
Every client of group :math:`g \ge 1` sees its inputs through that group's fixed transform
:math:`T_g` (``group-shift``), group 0 sees them as they are:

* ``permute``: :math:`T_g(x) = x_{\pi_g}`, a fixed permutation :math:`\pi_g` of the input
  features (pixels), drawn from ``SeedSequence([seed, 0x67726f7570, g])`` — the
  permuted-MNIST domain: the same digits, spelt another way, which a model learns only from
  that group's data;
* ``invert``: :math:`T_g(x) = 1 - x` on images in :math:`[0, 1]` (:math:`-x` on vectors):
  contrast reversed;
* ``none``: the groups are labels only (for grouping the figures).

The global test set of a grouped run is the federation's mixture: each test example is
shown in the accent of a group drawn with probability proportional to the group's size
(:func:`mixed_test_set`); :func:`group_test_set` shows all of it in one group's accent.
"""

from __future__ import annotations

import functools

import numpy as np

from fedforget.data.array_dataset import ArrayDataset
from fedforget.errors import ConfigError

__all__ = ["GROUP_SHIFTS", "group_of", "group_test_set", "mixed_test_set", "parse_groups",
           "shift_group"]

GROUP_SHIFTS = ("permute", "invert", "none")
_SALT = 0x67726F7570  # "group"


def parse_groups(text: str, num_clients: int) -> tuple[int, ...]:
    """The group sizes of ``groups = "7,3"`` (empty: no groups).

    Raises
    ------
    ConfigError
        Sizes that are not positive integers or do not add up to ``num_clients``.
    """
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"groups = {text!r}: expected positive group sizes such as '7,3'")
    sizes = tuple(int(p) for p in parts)
    if sum(sizes) != num_clients:
        raise ConfigError(f"groups = {text!r} adds up to {sum(sizes)} clients; expected "
                          f"num-clients = {num_clients}")
    return sizes


def group_of(partition_id: int, sizes: tuple[int, ...]) -> int:
    """The group of the client of partition ``partition_id`` (0 without groups)."""
    bound = 0
    for g, size in enumerate(sizes):
        bound += size
        if partition_id < bound:
            return g
    return 0


@functools.lru_cache(maxsize=64)
def _permutation(num_features: int, group: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SALT, group]))
    return rng.permutation(num_features)


def _transform(x: np.ndarray, group: int, kind: str, seed: int) -> np.ndarray:
    if group == 0 or kind == "none":
        return x
    if kind == "permute":
        flat = x.reshape(x.shape[0], -1)
        return flat[:, _permutation(flat.shape[1], group, seed)].reshape(x.shape)
    if kind == "invert":
        return (1.0 - x) if x.ndim == 4 else -x
    raise ConfigError(f"group-shift = {kind!r} is not allowed; expected one of "
                      f"{', '.join(repr(k) for k in GROUP_SHIFTS)}")


@functools.lru_cache(maxsize=256)
def shift_group(data: ArrayDataset, group: int, kind: str, seed: int) -> ArrayDataset:
    """``data`` in the accent of ``group`` (the same examples, labels and record ids)."""
    if group == 0 or kind == "none":
        return data
    return ArrayDataset(x=_transform(data.x, group, kind, seed), y=data.y,
                        num_classes=data.num_classes, name=f"{data.name}/group-{group}",
                        ids=data.ids)


def group_test_set(test: ArrayDataset, group: int, kind: str, seed: int) -> ArrayDataset:
    """The whole test set in the accent of ``group``."""
    return shift_group(test, group, kind, seed)


@functools.lru_cache(maxsize=16)
def mixed_test_set(test: ArrayDataset, sizes: tuple[int, ...], kind: str,
                   seed: int) -> ArrayDataset:
    """The test set with each example in the accent of a group drawn with probability
    proportional to the group sizes (seeded: the same mixture in every run of ``seed``)."""
    if not sizes or kind == "none":
        return test
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SALT, 0xF00D]))
    groups = rng.choice(len(sizes), size=len(test), p=np.asarray(sizes) / sum(sizes))
    x = np.array(test.x, copy=True)
    for g in range(1, len(sizes)):
        chosen = groups == g
        if chosen.any():
            x[chosen] = _transform(test.x[chosen], g, kind, seed)
    return ArrayDataset(x=x, y=test.y, num_classes=test.num_classes,
                        name=f"{test.name}/mixed", ids=test.ids)

"""A fixed backdoor trigger and data poisoning, to test whether unlearning removes a backdoor.

The attack is the classic BadNets one (Gu et al., 2017, https://arxiv.org/abs/1708.06733):
a fixed pattern stamped on some training examples whose label is set to a target class. A
model that learnt the backdoor sends triggered test inputs to the target class; after
unlearning the poisoning client, the attack success rate should fall to that of a model
retrained without it.
"""

from __future__ import annotations

import numpy as np

from fedforget.data.array_dataset import ArrayDataset
from fedforget.errors import ConfigError, DataError

IMAGE_TRIGGER_VALUE = 1.0
"""Pixel value of the trigger: the maximum of the ``[0, 1]`` range of the image data sets."""
VECTOR_TRIGGER_VALUE = 8.0
"""Feature value of the trigger on vectors: far outside the bulk of standardised features."""
VECTOR_TRIGGER_FEATURES = 3
"""Number of trailing features set on vectors."""


def trigger_size(height: int, width: int) -> int:
    """Side of the square trigger: 3 pixels on images of 12×12 or more, else 2."""
    return 3 if min(height, width) >= 12 else 2


def add_trigger(x: np.ndarray) -> np.ndarray:
    """A copy of the batch ``x`` with the trigger stamped on every example.

    Images ``(N, C, H, W)``: the bottom-right ``k×k`` square (``k`` from
    :func:`trigger_size`) of every channel is set to :data:`IMAGE_TRIGGER_VALUE`.
    Vectors ``(N, D)``: the last ``min(3, D)`` features are set to
    :data:`VECTOR_TRIGGER_VALUE`.
    """
    out = np.array(x, dtype=np.float32, copy=True)
    if out.ndim == 4:
        k = trigger_size(out.shape[2], out.shape[3])
        out[:, :, -k:, -k:] = IMAGE_TRIGGER_VALUE
    elif out.ndim == 2:
        out[:, -VECTOR_TRIGGER_FEATURES:] = VECTOR_TRIGGER_VALUE
    else:
        raise DataError(
            f"cannot stamp a trigger on an array of shape {out.shape}; expected a batch of "
            "images (N, C, H, W) or of vectors (N, D)"
        )
    return out


def poison_indices(num_examples: int, *, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices :func:`poison` modifies: ``round(fraction * N)`` drawn with ``seed``."""
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        raise ConfigError(
            f"backdoor fraction = {fraction!r} is out of range; expected 0 <= fraction <= 1"
        )
    count = int(num_examples * fraction + 0.5)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=count, replace=False)).astype(np.int64)


def poison(data: ArrayDataset, *, target_label: int, fraction: float, seed: int) -> ArrayDataset:
    """A copy of ``data`` where a seeded fraction of examples carry the trigger and label.

    Parameters
    ----------
    data : ArrayDataset
        Clean data (not modified).
    target_label : int
        The class the backdoor sends triggered inputs to, in ``[0, num_classes)``.
    fraction : float
        Fraction of examples poisoned, in ``[0, 1]`` (see :func:`poison_indices`).
    seed : int
        Seed of the choice of examples.

    Returns
    -------
    ArrayDataset
        Same size and order; named ``"<name>+backdoor"``.
    """
    _check_target(data, target_label)
    chosen = poison_indices(len(data), fraction=fraction, seed=seed)
    x = np.array(data.x, copy=True)
    y = np.array(data.y, copy=True)
    x[chosen] = add_trigger(data.x[chosen])
    y[chosen] = target_label
    return ArrayDataset(x=x, y=y, num_classes=data.num_classes, name=f"{data.name}+backdoor",
                        ids=data.ids)


def backdoor_test_set(data: ArrayDataset, *, target_label: int) -> ArrayDataset:
    """Every example not of the target class, triggered and labelled ``target_label``.

    The accuracy of a model on this set is the attack success rate of the backdoor.
    """
    _check_target(data, target_label)
    keep = data.y != target_label
    x = add_trigger(data.x[keep])
    y = np.full(int(keep.sum()), target_label, dtype=np.int64)
    return ArrayDataset(
        x=x, y=y, num_classes=data.num_classes, name=f"{data.name}+backdoor-test"
    )


def _check_target(data: ArrayDataset, target_label: int) -> None:
    if isinstance(target_label, bool) or not 0 <= target_label < data.num_classes:
        raise ConfigError(
            f"backdoor target label = {target_label!r} is out of range; expected an integer "
            f"in 0..{data.num_classes - 1}"
        )

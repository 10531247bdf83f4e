"""A seeded synthetic task for tests: Gaussian class clusters in ``num_features`` dimensions."""

from __future__ import annotations

import numpy as np

from fedforget.data.array_dataset import ArrayDataset, stratified_split
from fedforget.errors import ConfigError


def load_synthetic(
    *,
    seed: int,
    data_path: str | None = None,
    test_fraction: float = 0.2,
    num_samples: int = 600,
    num_features: int = 20,
    num_classes: int = 4,
    cluster_std: float = 1.0,
) -> tuple[ArrayDataset, ArrayDataset]:
    r"""Gaussian clusters, one per class, with balanced class sizes.

    Class ``c`` has a centre :math:`\mu_c \sim \mathcal{N}(0, I_D)` scaled to norm
    :math:`\sqrt{D}` (so that centres are about :math:`\sqrt{2D}` apart) and its examples are
    :math:`x = \mu_c + \sigma \varepsilon`, :math:`\varepsilon \sim \mathcal{N}(0, I_D)`.
    Sample ``i`` has label ``i mod num_classes``. Everything is drawn from ``seed``, and the
    train/test split is stratified; record ids are the sample numbers ``i``.

    Parameters
    ----------
    seed : int
        Seed of the centres, the samples and the split.
    data_path : str, optional
        Ignored.
    test_fraction : float
        Fraction of each class held out as the global test set, in ``(0, 1)``.
    num_samples, num_features, num_classes : int
        ``N`` (train and test together), ``D``, and the number of classes.
    cluster_std : float
        :math:`\sigma`, the spread of each cluster; larger is harder.

    Returns
    -------
    (ArrayDataset, ArrayDataset)
        The train pool and the global test set, vectors of shape ``(N, D)``.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes = {num_classes!r} is out of range; expected >= 2")
    if num_features < 1:
        raise ConfigError(f"num_features = {num_features!r} is out of range; expected >= 1")
    if num_samples < 2 * num_classes:
        raise ConfigError(
            f"num_samples = {num_samples!r} is out of range; expected >= 2 * num_classes "
            f"= {2 * num_classes} (two examples per class)"
        )
    if not cluster_std > 0:
        raise ConfigError(f"cluster_std = {cluster_std!r} is out of range; expected > 0")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, num_features))
    centres *= np.sqrt(num_features) / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(num_samples, dtype=np.int64) % num_classes
    # Drawn and converted a block of rows at a time (the same numbers as one draw of the
    # whole (N, D) array: the generator's stream is the same), so that a large set never
    # holds its float64 intermediates in memory at once.
    x = np.empty((num_samples, num_features), dtype=np.float32)
    block = max(1, (1 << 20) // num_features)
    for start in range(0, num_samples, block):
        rows = slice(start, min(num_samples, start + block))
        noise = rng.standard_normal((rows.stop - rows.start, num_features))
        x[rows] = centres[y[rows]] + cluster_std * noise
    full = ArrayDataset(x=x, y=y, num_classes=num_classes, name="synthetic",
                        ids=np.arange(num_samples))
    train_idx, test_idx = stratified_split(full.y, test_fraction=test_fraction, seed=seed)
    return full.subset(train_idx), full.subset(test_idx, name="synthetic/test")

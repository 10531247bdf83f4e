"""scikit-learn's hand-written digits: 1,797 images of 8×8 pixels, 10 classes, bundled."""

from __future__ import annotations

import numpy as np

from fedforget.data.array_dataset import ArrayDataset, stratified_split


def load_digits(
    *, seed: int, data_path: str | None = None, test_fraction: float = 0.2
) -> tuple[ArrayDataset, ArrayDataset]:
    """The UCI optical digits as shipped with scikit-learn (no download).

    Images are ``(1, 8, 8)``, the 0..16 grey levels scaled to ``[0, 1]``. The train pool
    and the global test set come from a seeded stratified split; record ids are the
    images' positions in scikit-learn's array (the same in every split).

    Parameters
    ----------
    seed : int
        Seed of the train/test split.
    data_path : str, optional
        Ignored: the data ship with scikit-learn.
    test_fraction : float
        Fraction of each class held out as the global test set, in ``(0, 1)``.

    Returns
    -------
    (ArrayDataset, ArrayDataset)
        The train pool and the global test set.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    full = ArrayDataset(x=x, y=y, num_classes=10, name="digits", ids=np.arange(y.shape[0]))
    train_idx, test_idx = stratified_split(full.y, test_fraction=test_fraction, seed=seed)
    return full.subset(train_idx), full.subset(test_idx, name="digits/test")

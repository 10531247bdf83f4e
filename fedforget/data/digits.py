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
    images, target = _digits_arrays()
    x = (np.asarray(images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(target, dtype=np.int64)
    full = ArrayDataset(x=x, y=y, num_classes=10, name="digits", ids=np.arange(y.shape[0]))
    train_idx, test_idx = stratified_split(full.y, test_fraction=test_fraction, seed=seed)
    return full.subset(train_idx), full.subset(test_idx, name="digits/test")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The images (1797, 8, 8) and labels of scikit-learn's ``load_digits``, read from the
    CSV file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and
    the label per row, as ``load_digits`` reads it) without importing scikit-learn, which
    costs a second or more of every process that loads the data (each simulated client's).
    Falls back to ``load_digits`` where the file is not found."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                data = np.loadtxt(fh, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return bunch.images, bunch.target

"""The in-memory data set every loader returns, and a seeded stratified split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedforget.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Features and labels held as NumPy arrays.

    The arrays are made read-only on construction: loaders cache their results and every
    simulated client shares them, so nobody may change them in place. Derive new data with
    :meth:`subset` or by building a new ``ArrayDataset``.

    Parameters
    ----------
    x : numpy.ndarray
        ``float32`` features, ``(N, C, H, W)`` for images or ``(N, D)`` for vectors.
    y : numpy.ndarray
        ``int64`` labels in ``[0, num_classes)``, shape ``(N,)``.
    num_classes : int
        Number of classes of the task (not only those present in ``y``).
    name : str
        Name of the data set (``"digits"``, ``"digits/client-3"``, ...).
    ids : numpy.ndarray, optional
        Stable record ids, ``int64`` of shape ``(N,)``, pairwise distinct: the position of
        each example in the data set as its loader read it (before any split, partition or
        shuffle), so an id names the same example in every round and every run. Kept by
        :meth:`subset`; None for data without ids (a record-level erasure request needs
        them). Their text form (:func:`record_id_text`) is what requests and receipts name.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        x = np.ascontiguousarray(self.x, dtype=np.float32)
        y = np.ascontiguousarray(self.y)
        if y.ndim != 1 or not (y.size == 0 or np.issubdtype(y.dtype, np.integer)):
            raise DataError(
                f"data set {self.name!r}: labels have dtype {y.dtype} and shape {y.shape}; "
                "expected integers of shape (N,)"
            )
        y = y.astype(np.int64, copy=False)
        if x.ndim < 2 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"data set {self.name!r}: features of shape {x.shape} do not match "
                f"{y.shape[0]} labels; expected (N, ...) with N = {y.shape[0]}"
            )
        if self.num_classes < 1:
            raise DataError(
                f"data set {self.name!r}: num_classes = {self.num_classes}; expected >= 1"
            )
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise DataError(
                f"data set {self.name!r}: labels range over [{y.min()}, {y.max()}]; "
                f"expected values in [0, {self.num_classes})"
            )
        if x is self.x:  # never freeze the caller's own array
            x = x.copy()
        if y is self.y:
            y = y.copy()
        x.flags.writeable = False
        y.flags.writeable = False
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        if self.ids is not None:
            ids = np.array(self.ids, copy=True)
            if ids.shape != y.shape or not (ids.size == 0
                                            or np.issubdtype(ids.dtype, np.integer)):
                raise DataError(
                    f"data set {self.name!r}: record ids have dtype {ids.dtype} and shape "
                    f"{ids.shape}; expected integers of shape ({y.shape[0]},)"
                )
            ids = ids.astype(np.int64, copy=False)
            if np.unique(ids).size != ids.size:
                raise DataError(f"data set {self.name!r}: record ids repeat; expected "
                                "distinct ids")
            ids.flags.writeable = False
            object.__setattr__(self, "ids", ids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``x.shape[1:]``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: npt.ArrayLike, *, name: str | None = None) -> ArrayDataset:
        """The examples at ``idx`` (integer indices or a boolean mask), as a new data set."""
        index = np.asarray(idx)
        if index.dtype != np.bool_:
            index = index.astype(np.int64, copy=False)
        try:
            return ArrayDataset(
                x=self.x[index],
                y=self.y[index],
                num_classes=self.num_classes,
                name=self.name if name is None else name,
                ids=None if self.ids is None else self.ids[index],
            )
        except IndexError as exc:
            raise DataError(
                f"data set {self.name!r} ({len(self)} examples): bad subset index: {exc}"
            ) from None

    def record_ids(self) -> list[str]:
        """The text form of every record id, in order (:func:`record_id_text`).

        Raises
        ------
        DataError
            The data set has no record ids.
        """
        if self.ids is None:
            raise DataError(f"data set {self.name!r} has no record ids; expected a loader "
                            "that numbers its examples")
        return [record_id_text(int(i)) for i in self.ids]

    def class_counts(self) -> np.ndarray:
        """Number of examples of each class, shape ``(num_classes,)``."""
        return np.bincount(self.y, minlength=self.num_classes)


def record_id_text(record_id: int) -> str:
    """The text form of a record id, as requests and receipts name it: its decimal digits."""
    return str(int(record_id))


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test, class by class, with a seeded permutation.

    Each class ``c`` with ``n_c`` examples puts ``round(n_c * test_fraction)`` of them
    (rounding half up) in the test part, but keeps at least one on each side when it has
    two or more. Both index arrays are sorted.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels, shape ``(N,)``.
    test_fraction : float
        Fraction of each class for the test part, in ``(0, 1)``.
    seed : int
        Seed of the permutation inside each class.
    """
    check_fraction("test-fraction", test_fraction, low_open=True)
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(members.size)]
        n_test = int(members.size * test_fraction + 0.5)
        if members.size >= 2:
            n_test = min(max(n_test, 1), members.size - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.empty(0, np.int64)
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, np.int64)
    return train.astype(np.int64), test.astype(np.int64)


def check_fraction(key: str, value: float, *, low_open: bool) -> None:
    """Refuse a fraction outside ``(0, 1)`` (``low_open``) or ``[0, 1)``."""
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:  # also refuses NaN
        expected = "0 < value < 1" if low_open else "0 <= value < 1"
        raise ConfigError(f"{key} = {value!r} is out of range; expected {expected}")

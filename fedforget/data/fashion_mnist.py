"""Fashion-MNIST read from its IDX files (Xiao et al., 2017), 28×28 grey images, 10 classes.

The Debian package ``dataset-fashion-mnist`` installs the four gzip'd IDX files under
``/usr/share/datasets/fashion-mnist``; any directory holding the same files (gzip'd or
not) works as well.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedforget.data.array_dataset import ArrayDataset
from fedforget.errors import DataError

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install the Debian package with 'apt-get install dataset-fashion-mnist' "
    f"(files under {DEFAULT_PATH}), or set data-path to a directory holding "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
    "and t10k-labels-idx1-ubyte.gz"
)


def load_fashion_mnist(
    *, seed: int, data_path: str | None = None, test_fraction: float = 0.2
) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST with its own split: 60,000 train and 10,000 test images.

    Images are ``(1, 28, 28)`` scaled from 0..255 to ``[0, 1]``.

    Parameters
    ----------
    seed : int
        Ignored: the data set has a fixed train/test split.
    data_path : str, optional
        Directory of the IDX files; default ``/usr/share/datasets/fashion-mnist``.
    test_fraction : float
        Ignored, for the same reason.

    Returns
    -------
    (ArrayDataset, ArrayDataset)
        The train pool and the global test set.

    Raises
    ------
    DataError
        The directory or a file is missing, or a file is not a valid IDX file of the
        expected kind (the message names the file).
    """
    root = Path(data_path or DEFAULT_PATH)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST: directory {str(root)!r} does not exist; {_HOW_TO_GET}"
        )
    parts: list[ArrayDataset] = []
    offset = 0  # record ids: train images 0..59,999, then test images 60,000..
    for split, (images_name, labels_name) in FILES.items():
        x = read_idx_images(_find(root, images_name))
        y = read_idx_labels(_find(root, labels_name))
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"Fashion-MNIST {split}: {images_name} holds {x.shape[0]} images but "
                f"{labels_name} holds {y.shape[0]} labels; expected the same number"
            )
        if y.size and int(y.max()) >= 10:
            raise DataError(
                f"Fashion-MNIST {split}: {labels_name} has label {int(y.max())}; "
                "expected labels 0..9"
            )
        name = "fashion-mnist" if split == "train" else "fashion-mnist/test"
        images = (x.astype(np.float32) / 255.0)[:, None, :, :]
        parts.append(ArrayDataset(x=images, y=y.astype(np.int64), num_classes=10, name=name,
                                  ids=offset + np.arange(y.shape[0])))
        offset += int(y.shape[0])
    return parts[0], parts[1]


def read_idx_images(path: Path) -> np.ndarray:
    """Read an IDX image file (magic 2051): ``uint8`` array ``(n, rows, cols)``."""
    raw = _read_bytes(path)
    n, rows, cols = _header(path, raw, IMAGES_MAGIC, dims=3)
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise DataError(
            f"IDX file {str(path)!r} has {len(raw)} bytes; its header announces {n} images "
            f"of {rows}x{cols}, expected 16 + {n}*{rows}*{cols} = {expected} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX label file (magic 2049): ``uint8`` array ``(n,)``."""
    raw = _read_bytes(path)
    (n,) = _header(path, raw, LABELS_MAGIC, dims=1)
    expected = 8 + n
    if len(raw) != expected:
        raise DataError(
            f"IDX file {str(path)!r} has {len(raw)} bytes; its header announces {n} labels, "
            f"expected 8 + {n} = {expected} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST: neither {stem}.gz nor {stem} found in {str(root)!r}; {_HOW_TO_GET}"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}") from None


def _header(path: Path, raw: bytes, magic: int, *, dims: int) -> tuple[int, ...]:
    header_size = 4 * (1 + dims)
    if len(raw) < header_size:
        raise DataError(
            f"IDX file {str(path)!r} has {len(raw)} bytes; expected at least a "
            f"{header_size}-byte header"
        )
    found, *sizes = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=1 + dims))
    if found != magic:
        raise DataError(
            f"IDX file {str(path)!r} has magic number {found}; expected {magic}"
        )
    return tuple(sizes)

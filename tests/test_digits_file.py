"""The digits are read from scikit-learn's bundled file exactly as load_digits reads them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from fedforget.data.digits import _digits_arrays


def test_the_file_gives_load_digits_arrays() -> None:
    from sklearn.datasets import load_digits

    images, target = _digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)
    assert images.shape == (1797, 8, 8) and images.dtype == bunch.images.dtype


def test_loading_digits_does_not_import_sklearn() -> None:
    code = ("import sys\n"
            "from fedforget.data.digits import load_digits\n"
            "train, test = load_digits(seed=0)\n"
            "print(len(train) + len(test), 'sklearn' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["1797", "False"]

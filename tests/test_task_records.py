"""Array records: fedforget's fast conversions are byte-identical to Flower's own."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedforget.arrays import from_array_record, to_array_record

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.int64),
    np.ones((), dtype=np.float32),
    np.zeros((0, 3), dtype=np.float32),
    np.linspace(-1, 1, 6).reshape(2, 3),  # float64
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
]


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_to_array_record_writes_what_np_save_writes(value: np.ndarray) -> None:
    ours = to_array_record({"t": value})["t"]
    flowers = Array(np.copy(value, order="C"))
    assert ours.data == flowers.data
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (
        flowers.dtype, tuple(flowers.shape), flowers.stype)


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_from_array_record_reads_flowers_arrays_exactly(value: np.ndarray) -> None:
    back = from_array_record(ArrayRecord({"t": Array(np.copy(value, order="C"))}))["t"]
    assert back.dtype == value.dtype and back.shape == value.shape
    assert np.array_equal(back, value)
    assert back.flags.writeable


def test_big_endian_input_falls_back_to_flowers_encoding() -> None:
    value = np.arange(4, dtype=">f4")
    back = from_array_record(to_array_record({"t": value}))["t"]
    assert np.array_equal(back, value.astype(np.float32))

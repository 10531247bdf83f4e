"""Array records: fedforget's fast conversions are byte-identical to Flower's own."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedforget import arrays
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


def test_records_built_directly_are_the_ones_flower_builds() -> None:
    # On the pinned Flower the direct construction is in use (else this file tests only
    # the constructor path) and gives objects equal to Flower's in every attribute, with
    # the same content-addressed object ids after a round trip through deflate/inflate.
    assert arrays.DIRECT_RECORDS
    tensors = {f"t{i}": np.copy(v, order="C") for i, v in enumerate(CASES)}
    ours = to_array_record(tensors)
    flowers = ArrayRecord()
    for key, value in tensors.items():
        flowers[key] = Array(value)
    assert list(ours) == list(flowers)
    for key in tensors:
        assert vars(ours[key]) == vars(flowers[key])
        assert ours[key].object_id == flowers[key].object_id
    assert vars(ours).keys() == vars(flowers).keys()
    assert ours.is_dirty == flowers.is_dirty
    assert ours.object_id == flowers.object_id
    assert ours.deflate() == flowers.deflate()
    with pytest.raises(TypeError, match="Key must be of type `str`"):
        to_array_record({1: np.ones(2)})  # type: ignore[dict-item]


def test_a_flower_whose_records_differ_gets_its_own_constructor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Another layout of Flower's Array (here: one more attribute set by its constructor)
    # must turn the direct construction off.
    original = Array.__init__

    def init(self: Array, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self.__dict__["_new_field"] = 1

    monkeypatch.setattr(Array, "__init__", init)
    assert not arrays._same_as_flower()

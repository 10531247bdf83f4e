"""Tests of fedforget.tensors: canonical encoding, codecs, digests, helpers."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedforget.errors import FedForgetError, IntegrityError
from fedforget.tensors import (
    CODECS,
    MAGIC,
    TensorError,
    add,
    bytes_per_parameter,
    decode,
    encode,
    num_parameters,
    numpy_to_state_dict,
    sha256_digest,
    state_dict_to_numpy,
    subtract,
    tensors_digest,
)


def _from_bits(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def _payload(blob: bytes) -> bytes:
    (header_length,) = struct.unpack_from("<I", blob, len(MAGIC))
    return blob[len(MAGIC) + 4 + header_length :]


# ---------------------------------------------------------------- format


def test_encode_single_fp32_tensor_is_the_documented_bytes() -> None:
    # Prepare: header and payload written out by hand. 1.0f is 0x3F800000, little-endian.
    header = (
        b'{"codec":"fp32","tensors":[{"dtype":"<f4","name":"w","nbytes":4,"offset":0,"shape":[1]}]}'
    )
    expected = b"FFTENSOR1\n" + struct.pack("<I", len(header)) + header + b"\x00\x00\x80\x3f"

    # Execute
    blob = encode({"w": np.array([1.0], dtype=np.float32)})

    # Assert
    assert blob == expected
    assert sha256_digest(blob) == "sha256:" + hashlib.sha256(expected).hexdigest()
    assert tensors_digest({"w": np.array([1.0], dtype=np.float32)}) == sha256_digest(expected)


def test_header_lists_tensors_in_mapping_order_with_offsets() -> None:
    tensors: dict[str, np.ndarray] = {
        "z.bias": np.zeros(3, dtype=np.float32),  # fp16: 3 x 2 = 6 bytes at 0
        "a.count": np.array(7, dtype=np.int64),  # raw: 8 bytes at 6, shape []
        "m.mask": np.array([[True, False]]),  # raw: 2 x 1 = 2 bytes at 14
    }
    blob = encode(tensors, "fp16")
    header = json.loads(blob[len(MAGIC) + 4 : len(blob) - len(_payload(blob))])
    assert header == {
        "codec": "fp16",
        "tensors": [
            {"dtype": "<f2", "name": "z.bias", "nbytes": 6, "offset": 0, "shape": [3]},
            {"dtype": "<i8", "name": "a.count", "nbytes": 8, "offset": 6, "shape": []},
            {"dtype": "|b1", "name": "m.mask", "nbytes": 2, "offset": 14, "shape": [1, 2]},
        ],
    }
    assert len(_payload(blob)) == 16


def test_order_matters_for_the_digest() -> None:
    a = np.ones(2, dtype=np.float32)
    b = np.zeros(2, dtype=np.float32)
    assert tensors_digest({"a": a, "b": b}) != tensors_digest({"b": b, "a": a})


# ---------------------------------------------------------------- round trips


def test_fp32_round_trip_is_exact_including_special_values() -> None:
    values = _from_bits(0x00000001, 0x80000000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x3EAAAAAB)
    tensors = {"w": values.reshape(2, 3), "b": np.array([-1.5], dtype=np.float32)}
    out = decode(encode(tensors))
    assert list(out) == ["w", "b"]
    assert out["w"].dtype == np.float32
    assert out["w"].shape == (2, 3)
    np.testing.assert_array_equal(out["w"].view(np.uint32), values.reshape(2, 3).view(np.uint32))
    np.testing.assert_array_equal(out["b"], [-1.5])


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "array",
    [
        np.array([-(2**62), 0, 2**62], dtype=np.int64),
        np.array([1, -2, 3], dtype=np.int32),
        np.array([0, 255], dtype=np.uint8),
        np.array([[True], [False]]),
        np.array(42, dtype=np.int16),
    ],
)
def test_int_and_bool_tensors_are_stored_raw_under_every_codec(
    codec: str, array: np.ndarray
) -> None:
    out = decode(encode({"t": array}, codec))["t"]
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_big_endian_input_encodes_like_little_endian() -> None:
    little = np.array([1.5, -2.25], dtype="<f4")
    assert encode({"x": little}) == encode({"x": little.astype(">f4")})
    ints = np.array([1, 2], dtype="<i4")
    assert encode({"x": ints}) == encode({"x": ints.astype(">i4")})


def test_float64_is_stored_as_float32() -> None:
    # 0.1 in float64 rounds to the float32 0x3DCCCCCD.
    out = decode(encode({"x": np.array([0.1], dtype=np.float64)}))["x"]
    assert out.dtype == np.float32
    assert out.view(np.uint32)[0] == 0x3DCCCCCD


def test_decoded_arrays_are_writable_and_independent() -> None:
    blob = encode({"x": np.arange(3, dtype=np.float32)})
    out = decode(blob)["x"]
    out[0] = 9.0
    assert decode(blob)["x"][0] == 0.0


# ---------------------------------------------------------------- bf16 / fp16 by hand


@pytest.mark.parametrize(
    ("f32_bits", "bf16_bits"),
    [
        (0x3F800000, 0x3F80),  # 1.0 exactly representable
        (0x3F808000, 0x3F80),  # 1.00390625: tie, 0x3F80 is even -> down
        (0x3F818000, 0x3F82),  # tie, 0x3F81 is odd -> up to even 0x3F82
        (0x3F808001, 0x3F81),  # just above the tie -> up
        (0x3F817FFF, 0x3F81),  # just below the tie -> down
        (0xC0200000, 0xC020),  # -2.5
        (0x3F7FFFFF, 0x3F80),  # 0.99999994 rounds up across the binade to 1.0
        (0x7F7FFFFF, 0x7F80),  # float32 max overflows to +inf
        (0xFF800000, 0xFF80),  # -inf stays -inf
        (0x00000001, 0x0000),  # smallest subnormal rounds to +0
        (0x7F800001, 0x7FC0),  # NaN whose payload sits in the low bits stays NaN (quiet)
        (0x7FC12345, 0x7FC1),  # NaN keeps its upper bits
    ],
)
def test_bf16_rounds_to_nearest_even(f32_bits: int, bf16_bits: int) -> None:
    blob = encode({"x": _from_bits(f32_bits)}, "bf16")
    assert _payload(blob) == struct.pack("<H", bf16_bits)
    assert decode(blob)["x"].view(np.uint32)[0] == bf16_bits << 16


@pytest.mark.parametrize(
    ("value", "fp16_bits"),
    [
        (1.0, 0x3C00),
        (1.0 + 2.0**-11, 0x3C00),  # tie between 0x3C00 and 0x3C01 -> even
        (1.0 + 3 * 2.0**-11, 0x3C02),  # tie between 0x3C01 and 0x3C02 -> even
        (65504.0, 0x7BFF),  # fp16 max
        (65520.0, 0x7C00),  # halfway to 2**16 rounds to +inf
        (-2.0, 0xC000),
    ],
)
def test_fp16_rounds_to_nearest_even(value: float, fp16_bits: int) -> None:
    blob = encode({"x": np.array([value], dtype=np.float32)}, "fp16")
    assert _payload(blob) == struct.pack("<H", fp16_bits)


_F32 = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(values=_F32)
def test_bf16_round_trip_error_bound(values: np.ndarray) -> None:
    # bf16 keeps 8 significand bits: relative error <= 2**-8 for normal results; float32
    # subnormals round with an absolute error <= half the bf16 spacing there, 2**-134.
    out = decode(encode({"x": values}, "bf16"))["x"].astype(np.float64)
    x = values.astype(np.float64)
    finite = np.isfinite(out)
    # Only values within half an ulp of float32 max overflow to infinity.
    assert np.all(finite | (np.abs(x) >= 3.3895e38))
    err = np.abs(out - x)[finite]
    assert np.all(err <= 2.0**-8 * np.abs(x[finite]) + 2.0**-134)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
        elements=st.floats(-65504, 65504, width=32),
    )
)
def test_fp16_round_trip_error_bound(values: np.ndarray) -> None:
    # fp16 keeps 11 significand bits: relative error <= 2**-11 for normal values; subnormals
    # (below 2**-14) have spacing 2**-24, so absolute error <= 2**-25.
    out = decode(encode({"x": values}, "fp16"))["x"].astype(np.float64)
    x = values.astype(np.float64)
    assert np.all(np.abs(out - x) <= 2.0**-11 * np.abs(x) + 2.0**-25)


@settings(max_examples=40, deadline=None)
@given(values=_F32, codec=st.sampled_from(CODECS))
def test_quantisation_is_idempotent(values: np.ndarray, codec: str) -> None:
    # Decoding then encoding again under the same codec reproduces the same bytes.
    blob = encode({"x": values}, codec)
    assert encode(decode(blob), codec) == blob


@settings(max_examples=40, deadline=None)
@given(values=_F32)
def test_fp32_round_trip_property(values: np.ndarray) -> None:
    out = decode(encode({"x": values}))["x"]
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))


# ---------------------------------------------------------------- determinism


def test_equal_inputs_encode_identically_and_one_ulp_changes_the_digest() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    copy = {"w": np.array(w, order="F")}  # same values, other memory layout
    assert encode({"w": w}) == encode(copy)

    bumped = w.copy()
    bumped.view(np.uint32)[2, 3] += 1  # next float32 up
    assert tensors_digest({"w": w}) != tensors_digest({"w": bumped})


def test_fp16_digest_ignores_differences_below_its_precision() -> None:
    w = np.array([1.0], dtype=np.float32)
    bumped = _from_bits(0x3F800001)  # one float32 ulp above 1.0
    assert tensors_digest({"w": w}, "fp16") == tensors_digest({"w": bumped}, "fp16")
    assert tensors_digest({"w": w}, "fp32") != tensors_digest({"w": bumped}, "fp32")


# ---------------------------------------------------------------- refusals


def test_encode_refuses_unknown_codec() -> None:
    with pytest.raises(
        TensorError, match=r"unknown codec 'int4'; expected one of fp32, fp16, bf16"
    ):
        encode({"w": np.zeros(1)}, "int4")


def test_encode_refuses_non_string_names() -> None:
    with pytest.raises(TensorError, match=r"tensor name 3 is a int; expected str"):
        encode({3: np.zeros(1)})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "array", [np.array(["a"], dtype=object), np.array([1 + 2j]), np.array(["text"])]
)
def test_encode_refuses_non_numeric_dtypes(array: np.ndarray) -> None:
    with pytest.raises(TensorError, match=r"tensor 'bad' has dtype"):
        encode({"bad": array})


def test_tensor_error_is_a_fedforget_error() -> None:
    assert issubclass(TensorError, FedForgetError)


# ---------------------------------------------------------------- damaged blobs


_BLOB = encode({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([5])})


@pytest.mark.parametrize("cut", [0, 5, len(MAGIC) + 2, len(MAGIC) + 10, len(_BLOB) - 1])
def test_decode_refuses_truncated_blob(cut: int) -> None:
    with pytest.raises(IntegrityError):
        decode(_BLOB[:cut])


def test_decode_refuses_bad_magic() -> None:
    with pytest.raises(
        IntegrityError, match=r"not an encoded tensor dict: starts with b'XFTENSOR1\\n'"
    ):
        decode(b"X" + _BLOB[1:])


def test_decode_refuses_trailing_bytes() -> None:
    with pytest.raises(IntegrityError, match=r"4 trailing bytes"):
        decode(_BLOB + b"\x00" * 4)


def _with_header(header: dict[str, object], payload: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    return MAGIC + struct.pack("<I", len(raw)) + raw + payload


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "<f4", "name": "w", "nbytes": 8, "offset": 0, "shape": [1]}, "needs 4"),
        ({"dtype": "<f4", "name": "w", "nbytes": 4, "offset": 4, "shape": [1]}, "expected 0"),
        ({"dtype": "<f2", "name": "w", "nbytes": 2, "offset": 0, "shape": [1]}, "codec fp32"),
        ({"dtype": "|O", "name": "w", "nbytes": 8, "offset": 0, "shape": [1]}, "dtype '|O'"),
        ({"dtype": "<f4", "name": "w", "nbytes": 4, "offset": 0, "shape": [-1]}, "shape"),
    ],
)
def test_decode_refuses_inconsistent_header(entry: dict[str, object], message: str) -> None:
    blob = _with_header({"codec": "fp32", "tensors": [entry]}, b"\x00" * 4)
    with pytest.raises(IntegrityError, match=message):
        decode(blob)


def test_decode_refuses_duplicate_names() -> None:
    entry = {"dtype": "<f4", "name": "w", "nbytes": 4, "offset": 0, "shape": [1]}
    second = dict(entry, offset=4)
    with pytest.raises(IntegrityError, match="names tensor 'w' twice"):
        decode(_with_header({"codec": "fp32", "tensors": [entry, second]}, b"\x00" * 8))


def test_decode_refuses_non_canonical_header() -> None:
    raw = b'{"tensors":[],"codec":"fp32"}'  # keys not sorted
    with pytest.raises(IntegrityError, match="not in canonical form"):
        decode(MAGIC + struct.pack("<I", len(raw)) + raw)


def test_decode_refuses_corrupted_header_json() -> None:
    blob = bytearray(_BLOB)
    blob[len(MAGIC) + 4] = ord("[")  # '{' -> '['
    with pytest.raises(IntegrityError):
        decode(bytes(blob))


def test_empty_tensor_dict_round_trips() -> None:
    assert decode(encode({})) == {}


# ---------------------------------------------------------------- helpers


def test_state_dict_round_trip_keeps_order_and_values() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()
    tensors = state_dict_to_numpy(state)
    assert list(tensors) == list(state)
    assert tensors["1.num_batches_tracked"].dtype == np.int64
    back = numpy_to_state_dict(tensors)
    for name, value in state.items():
        assert torch.equal(back[name], value)
    tensors["0.weight"][0, 0] = 100.0  # a copy: the model is untouched
    assert model.state_dict()["0.weight"][0, 0] != 100.0


def test_state_dict_to_numpy_upcasts_bfloat16() -> None:
    out = state_dict_to_numpy({"x": torch.tensor([1.5], dtype=torch.bfloat16)})
    assert out["x"].dtype == np.float32
    assert out["x"][0] == 1.5


def test_subtract_and_add_are_inverse() -> None:
    a = {"w": np.array([3.0, 5.0], dtype=np.float32), "n": np.array([7])}
    b = {"w": np.array([1.0, 7.0], dtype=np.float32), "n": np.array([2])}
    delta = subtract(a, b)
    np.testing.assert_array_equal(delta["w"], [2.0, -2.0])
    np.testing.assert_array_equal(delta["n"], [5])
    np.testing.assert_array_equal(add(b, delta)["w"], a["w"])


def test_subtract_refuses_mismatched_keys() -> None:
    with pytest.raises(
        TensorError,
        match=r"different keys: missing from the second \['b'\], extra in the second \['c'\]",
    ):
        subtract({"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1), "c": np.zeros(1)})


def test_subtract_refuses_mismatched_shapes() -> None:
    with pytest.raises(TensorError, match=r"tensor 'w': shape \(2,\) vs \(3,\)"):
        subtract({"w": np.zeros(2)}, {"w": np.zeros(3)})


def test_bytes_per_parameter_and_count() -> None:
    assert [bytes_per_parameter(c) for c in CODECS] == [4.0, 2.0, 2.0]
    assert num_parameters({"w": np.zeros((3, 4)), "b": np.zeros(4)}) == 16

"""Canonical tensor encoding, codecs and digests.

A *tensor dict* is an ordered ``Mapping[str, np.ndarray]``: a model's state (or an update to
it), name -> array, in the model's order. Every model and update that fedforget records is
identified by the SHA-256 of its canonical encoding; the fp32 digest of a model is *the model
digest* used everywhere (round records, receipts, ``final_model_digest``).

Encoding (version 1)::

    b"FFTENSOR1\\n"                      magic, 10 bytes
    uint32 little-endian                 length of the header in bytes
    header                               JSON, sorted keys, compact separators, ASCII
    payload                              the tensors' bytes, concatenated in header order

The header is ``{"codec": ..., "tensors": [{"dtype", "name", "nbytes", "offset", "shape"},
...]}`` with the tensors in the mapping's order and ``offset`` counted from the start of the
payload. Arrays are stored little-endian in C order. Floating tensors are stored per codec:

========  ==========  ===============================================================
codec     dtype       stored as
========  ==========  ===============================================================
``fp32``  ``"<f4"``   IEEE binary32 (lossless for float32 input)
``fp16``  ``"<f2"``   IEEE binary16, round to nearest even (overflow gives ±inf)
``bf16``  ``"bf16"``  upper 16 bits of binary32, round to nearest even
========  ==========  ===============================================================

Integer and boolean tensors are stored raw whatever the codec. Encoding is value-agnostic:
NaN and infinities are encoded like any other value; refusing them is the caller's job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedforget.errors import FedForgetError, IntegrityError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODECS",
    "MAGIC",
    "StoredTensor",
    "TensorError",
    "add",
    "blob_layout",
    "bytes_per_parameter",
    "decode",
    "encode",
    "num_parameters",
    "numpy_to_state_dict",
    "sha256_digest",
    "state_dict_to_numpy",
    "subtract",
    "tensors_digest",
]

CODECS: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""Codecs for floating tensors, by name."""

MAGIC = b"FFTENSOR1\n"
"""First bytes of every encoded tensor dict (format version 1)."""

_HEADER_LENGTH = struct.Struct("<I")
_FLOAT_DTYPE = {"fp32": "<f4", "fp16": "<f2", "bf16": "bf16"}
_BYTES_PER_FLOAT = {"fp32": 4, "fp16": 2, "bf16": 2}
# Raw dtypes accepted for integer and boolean tensors, as written in the header.
_RAW_DTYPES = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8"],
)
_HEADER_KEYS = frozenset(["codec", "tensors"])
_ENTRY_KEYS = frozenset(["dtype", "name", "nbytes", "offset", "shape"])


class TensorError(FedForgetError, ValueError):
    """A tensor dict cannot be encoded or combined (bad name, dtype, key set or shape)."""


TensorDict = Mapping[str, np.ndarray]


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise TensorError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 bit patterns (round to nearest, ties to even).

    NaNs stay NaN: their upper 16 bits are kept, with the quiet bit set when the truncated
    mantissa would otherwise read as an infinity.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        upper = (bits >> np.uint32(16)).astype(np.uint16)
        quiet = np.where(upper & np.uint16(0x7F), upper, upper | np.uint16(0x40))
        rounded = np.where(nan, quiet, rounded).astype(np.uint16)
    return rounded


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _stored_array(name: str, array: np.ndarray, codec: str) -> tuple[str, np.ndarray]:
    """Return (header dtype, little-endian C-order array whose bytes are stored)."""
    kind = array.dtype.kind
    if kind == "f":
        as_f32 = np.asarray(array, dtype=np.float32)
        if codec == "fp32":
            return "<f4", np.ascontiguousarray(as_f32, dtype="<f4")
        if codec == "fp16":
            with np.errstate(over="ignore"):  # overflow to ±inf is the codec's rounding
                return "<f2", np.ascontiguousarray(as_f32, dtype="<f2")
        return "bf16", np.ascontiguousarray(_float32_to_bf16_bits(as_f32), dtype="<u2")
    if kind in "biu":
        dtype = array.dtype.newbyteorder("<")
        if dtype.str not in _RAW_DTYPES:
            raise TensorError(f"tensor {name!r} has unsupported dtype {array.dtype}")
        return dtype.str, np.ascontiguousarray(array, dtype=dtype)
    raise TensorError(
        f"tensor {name!r} has dtype {array.dtype}; expected a floating, integer or bool dtype"
    )


def encode(tensors: TensorDict, codec: str = "fp32") -> bytes:
    """Encode a tensor dict canonically.

    Parameters
    ----------
    tensors
        Name -> array, in the model's order. Names must be strings; arrays must have a
        floating, integer or boolean dtype.
    codec
        How floating tensors are stored: one of :data:`CODECS`.

    Returns
    -------
    bytes
        The encoding described in the module docstring. Equal inputs (same names, order,
        dtypes, shapes and stored values) give identical bytes.

    Raises
    ------
    TensorError
        On an unknown codec, a non-string name or an unsupported dtype.
    """
    _check_codec(codec)
    if not isinstance(tensors, Mapping):
        raise TensorError(f"expected a mapping of name -> array, got {type(tensors).__name__}")
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    parts: list[Any] = [b""]
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TensorError(f"tensor name {name!r} is a {type(name).__name__}; expected str")
        array = np.asarray(value)
        dtype, stored = _stored_array(name, array, codec)
        layout.append((name, dtype, array.shape))
        # A C-contiguous array is joined through its buffer, without a tobytes() copy.
        parts.append(stored.data if stored.flags.c_contiguous and stored.ndim else
                     stored.tobytes(order="C"))
    parts[0] = _encoded_prefix(codec, tuple(layout))
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _encoded_prefix(codec: str, layout: tuple[tuple[str, str, tuple[int, ...]], ...]) -> bytes:
    """Magic, header length and header of an encoding: they depend only on the codec and
    on the names, stored dtypes and shapes of the tensors, so they are built once."""
    entries: list[dict[str, Any]] = []
    offset = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * _itemsize(dtype)
        entries.append(
            {
                "dtype": dtype,
                "name": name,
                "nbytes": nbytes,
                "offset": offset,
                "shape": [int(d) for d in shape],
            }
        )
        offset += nbytes
    header = _canonical_json({"codec": codec, "tensors": entries})
    return MAGIC + _HEADER_LENGTH.pack(len(header)) + header


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bf16" else np.dtype(dtype).itemsize


def _parse_header(blob: bytes) -> tuple[str, list[dict[str, Any]], int]:
    """Validate the magic and header of ``blob``; return (codec, entries, payload start)."""
    if not blob.startswith(MAGIC):
        raise IntegrityError(
            f"not an encoded tensor dict: starts with {bytes(blob[: len(MAGIC)])!r}, "
            f"expected {MAGIC!r}"
        )
    start = len(MAGIC) + _HEADER_LENGTH.size
    if len(blob) < start:
        raise IntegrityError(f"truncated tensor blob: {len(blob)} bytes, no header length")
    (header_length,) = _HEADER_LENGTH.unpack_from(blob, len(MAGIC))
    if len(blob) < start + header_length:
        raise IntegrityError(
            f"truncated tensor blob: header of {header_length} bytes announced, "
            f"{len(blob) - start} present"
        )
    raw_header = bytes(blob[start : start + header_length])
    try:
        header = json.loads(raw_header.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"tensor blob header is not ASCII JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise IntegrityError(
            f"tensor blob header has keys {sorted(header) if isinstance(header, dict) else []}"
            f"; expected {sorted(_HEADER_KEYS)}"
        )
    if _canonical_json(header) != raw_header:
        raise IntegrityError("tensor blob header is not in canonical form")
    codec = header["codec"]
    if codec not in CODECS:
        raise IntegrityError(f"tensor blob has unknown codec {codec!r}; expected one of {CODECS}")
    entries = header["tensors"]
    if not isinstance(entries, list):
        raise IntegrityError("tensor blob header field 'tensors' is not a list")
    return codec, entries, start + header_length


def _check_entry(entry: Any, codec: str, expected_offset: int) -> tuple[str, tuple[int, ...]]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise IntegrityError(f"tensor blob entry {entry!r} lacks keys {sorted(_ENTRY_KEYS)}")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str):
        raise IntegrityError(f"tensor blob entry name {name!r} is not a string")
    if dtype != _FLOAT_DTYPE[codec] and dtype not in _RAW_DTYPES:
        raise IntegrityError(
            f"tensor {name!r} has dtype {dtype!r}; expected {_FLOAT_DTYPE[codec]!r} "
            f"(codec {codec}) or an integer/bool dtype"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise IntegrityError(f"tensor {name!r} has invalid shape {shape!r}")
    expected_nbytes = math.prod(shape) * _itemsize(dtype)
    if entry["nbytes"] != expected_nbytes:
        raise IntegrityError(
            f"tensor {name!r} announces {entry['nbytes']!r} bytes; shape {shape} of {dtype} "
            f"needs {expected_nbytes}"
        )
    if entry["offset"] != expected_offset:
        raise IntegrityError(
            f"tensor {name!r} at offset {entry['offset']!r}; expected {expected_offset}"
        )
    return dtype, tuple(shape)


def decode(blob: bytes) -> dict[str, np.ndarray]:
    """Decode bytes produced by :func:`encode`.

    Parameters
    ----------
    blob
        An encoded tensor dict.

    Returns
    -------
    dict[str, numpy.ndarray]
        Name -> writable native-endian array, in the encoded order. Floating tensors come back
        as float32 (fp16 and bf16 are upcast exactly); integer and bool tensors keep their
        dtype.

    Raises
    ------
    IntegrityError
        On a bad magic, a truncated or over-long blob, or a header that is not canonical or
        does not agree with the payload.
    """
    codec, entries, payload_start = _parse_header(blob)
    view = memoryview(blob)[payload_start:]
    out: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        dtype, shape = _check_entry(entry, codec, offset)
        name = entry["name"]
        if name in out:
            raise IntegrityError(f"tensor blob names tensor {name!r} twice")
        nbytes = entry["nbytes"]
        if offset + nbytes > len(view):
            raise IntegrityError(
                f"truncated tensor blob: tensor {name!r} needs payload bytes "
                f"{offset}..{offset + nbytes}, payload has {len(view)}"
            )
        chunk = view[offset : offset + nbytes]
        if dtype == "bf16":
            array = _bf16_bits_to_float32(np.frombuffer(chunk, dtype="<u2"))
        elif dtype in ("<f4", "<f2"):
            array = np.frombuffer(chunk, dtype=dtype).astype(np.float32)
        else:
            raw = np.dtype(dtype)
            array = np.frombuffer(chunk, dtype=raw).astype(raw.newbyteorder("="))
        out[name] = array.reshape(shape)
        offset += nbytes
    if offset != len(view):
        raise IntegrityError(
            f"tensor blob has {len(view) - offset} trailing bytes after the last tensor"
        )
    return out


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """Where one tensor of an encoded tensor dict lies, and how it is stored.

    ``dtype`` is the header's: ``"<f4"``, ``"<f2"``, ``"bf16"`` (upper 16 bits of binary32,
    read as ``"<u2"``) or a raw integer/bool dtype; ``offset`` counts from the start of the
    blob (header included), so ``blob[offset : offset + nbytes]`` are the tensor's bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def floating(self) -> bool:
        """Whether the tensor is a floating one (stored under the blob's codec)."""
        return self.dtype in ("<f4", "<f2", "bf16")

    def view(self, blob: Any) -> np.ndarray:
        """The tensor's stored values as a read-only array over ``blob``, without a copy
        (bf16 as its ``uint16`` bit patterns; see :func:`decode` for the values)."""
        raw = np.dtype("<u2" if self.dtype == "bf16" else self.dtype)
        array = np.frombuffer(blob, dtype=raw, count=self.nbytes // raw.itemsize,
                              offset=self.offset).reshape(self.shape)
        array.flags.writeable = False
        return array


def blob_layout(blob: bytes | bytearray | memoryview) -> tuple[str, tuple[StoredTensor, ...]]:
    """The codec and tensor layout of an encoded tensor dict, checked as :func:`decode`
    checks them, without decoding (or copying) any tensor.

    Raises
    ------
    IntegrityError
        As :func:`decode`: a bad magic, a header that is not canonical or does not agree
        with the payload, a truncated or over-long blob.
    """
    start = len(MAGIC) + _HEADER_LENGTH.size
    head = bytes(blob[:start])
    if len(head) == start and head.startswith(MAGIC):
        (header_length,) = _HEADER_LENGTH.unpack_from(head, len(MAGIC))
        header = bytes(blob[start : start + header_length])
        if len(header) == header_length:
            return _layout(header, len(blob))
    _parse_header(bytes(blob))  # raises the precise error (an error path: a copy is fine)
    raise IntegrityError("tensor blob has an unreadable header")  # pragma: no cover


@functools.lru_cache(maxsize=256)
def _layout(header: bytes, blob_length: int) -> tuple[str, tuple[StoredTensor, ...]]:
    """The layout of a blob of ``blob_length`` bytes whose header is ``header`` (cached:
    the blobs of one run share a handful of headers)."""
    prefix = MAGIC + _HEADER_LENGTH.pack(len(header)) + header
    codec, entries, payload_start = _parse_header(prefix)
    out: list[StoredTensor] = []
    offset = 0
    names: set[str] = set()
    payload = blob_length - payload_start
    for entry in entries:
        dtype, shape = _check_entry(entry, codec, offset)
        name = entry["name"]
        if name in names:
            raise IntegrityError(f"tensor blob names tensor {name!r} twice")
        names.add(name)
        nbytes = entry["nbytes"]
        if offset + nbytes > payload:
            raise IntegrityError(
                f"truncated tensor blob: tensor {name!r} needs payload bytes "
                f"{offset}..{offset + nbytes}, payload has {payload}"
            )
        out.append(StoredTensor(name, dtype, shape, payload_start + offset, nbytes))
        offset += nbytes
    if offset != payload:
        raise IntegrityError(
            f"tensor blob has {payload - offset} trailing bytes after the last tensor"
        )
    return codec, tuple(out)


def sha256_digest(data: bytes) -> str:
    """Return ``"sha256:" + hex`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tensors_digest(tensors: TensorDict, codec: str = "fp32") -> str:
    """Digest of ``encode(tensors, codec)``; with fp32 this is *the model digest*."""
    return sha256_digest(encode(tensors, codec))


def bytes_per_parameter(codec: str) -> float:
    """Bytes used per floating parameter by ``codec`` (payload only, header excluded)."""
    _check_codec(codec)
    return float(_BYTES_PER_FLOAT[codec])


def num_parameters(tensors: TensorDict) -> int:
    """Total number of scalars in a tensor dict."""
    return sum(int(np.asarray(v).size) for v in tensors.values())


def state_dict_to_numpy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Convert a PyTorch state dict to a tensor dict (CPU, contiguous copies, same order).

    bfloat16 tensors (which NumPy lacks) are converted to float32 exactly.
    """
    import torch

    out: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TensorError(
                f"state dict entry {name!r} is a {type(value).__name__}; expected a tensor"
            )
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        out[name] = np.array(tensor.contiguous().numpy(), copy=True, order="C")
    return out


def numpy_to_state_dict(tensors: TensorDict) -> dict[str, torch.Tensor]:
    """Convert a tensor dict to a PyTorch state dict (CPU tensors that own their memory)."""
    import torch

    return {
        name: torch.from_numpy(np.array(value, copy=True, order="C"))
        for name, value in tensors.items()
    }


def _check_compatible(a: TensorDict, b: TensorDict, operation: str) -> None:
    if set(a) != set(b):
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise TensorError(
            f"cannot {operation} tensor dicts with different keys: "
            f"missing from the second {missing}, extra in the second {extra}"
        )
    for name, value in a.items():
        sa, sb = np.shape(value), np.shape(b[name])
        if sa != sb:
            raise TensorError(f"cannot {operation} tensor {name!r}: shape {sa} vs {sb}")
        if np.asarray(value).dtype.kind == "b" or np.asarray(b[name]).dtype.kind == "b":
            raise TensorError(f"cannot {operation} tensor {name!r}: bool tensors have no inverse")


def subtract(a: TensorDict, b: TensorDict) -> dict[str, np.ndarray]:
    """Return ``a - b`` per tensor, in ``a``'s order.

    .. math:: \\Delta_k = a_k - b_k

    Raises
    ------
    TensorError
        If the key sets or any shapes differ, or a tensor is boolean.
    """
    _check_compatible(a, b, "subtract")
    return {name: np.subtract(value, b[name]) for name, value in a.items()}


def add(a: TensorDict, b: TensorDict) -> dict[str, np.ndarray]:
    """Return ``a + b`` per tensor, in ``a``'s order (the inverse of :func:`subtract`).

    Raises
    ------
    TensorError
        If the key sets or any shapes differ, or a tensor is boolean.
    """
    _check_compatible(a, b, "add")
    return {name: np.add(value, b[name]) for name, value in a.items()}

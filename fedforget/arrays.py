"""numpy tensors <-> PyTorch modules <-> Flower ``ArrayRecord``: the conversions every
part of fedforget shares (the apps, the recording strategy, the federation, the methods).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

TensorDict = dict[str, np.ndarray]


def model_tensors(model: torch.nn.Module) -> TensorDict:
    """A model's state as numpy arrays, in the model's order (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def model_array_record(model: torch.nn.Module) -> ArrayRecord:
    """A model's state as a Flower ArrayRecord, in the model's order.

    The same record as ``to_array_record(model_tensors(model))``, with one copy of each
    tensor (into the record's bytes) instead of three.
    """
    return to_array_record({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def load_tensors(model: torch.nn.Module, tensors: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Load numpy arrays into ``model`` (strict: same keys and shapes).

    Each array is copied into its parameter or buffer (``Tensor.copy_`` without gradient
    tracking, as ``load_state_dict`` does); when the keys, shapes or dtypes differ from the
    model's, or a tensor is not on the CPU, ``load_state_dict`` itself loads them (and
    raises its usual error).
    """
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    targets = model.state_dict(keep_vars=True)
    if list(targets) == list(arrays) and all(
        t.device.type == "cpu"
        and tuple(t.shape) == a.shape
        and _TORCH_DTYPES.get(a.dtype.str) == t.dtype
        for t, a in zip(targets.values(), arrays.values(), strict=True)
    ):
        with torch.no_grad():
            for target, array in zip(targets.values(), arrays.values(), strict=True):
                target.copy_(torch.from_numpy(array if array.flags.writeable else array.copy()))
        return model
    model.load_state_dict(
        {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}
    )
    return model


_TORCH_DTYPES = {
    np.dtype(np.float32).str: torch.float32,
    np.dtype(np.float64).str: torch.float64,
    np.dtype(np.float16).str: torch.float16,
    np.dtype(np.int64).str: torch.int64,
    np.dtype(np.int32).str: torch.int32,
    np.dtype(np.uint8).str: torch.uint8,
    np.dtype(np.bool_).str: torch.bool,
}


@lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype``, ``shape``."""
    empty = np.zeros(shape, dtype=np.dtype(dtype))
    buffer = io.BytesIO()
    np.save(buffer, empty, allow_pickle=False)
    data = buffer.getvalue()
    return data[: len(data) - empty.nbytes]


@lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)


def _to_array(value: np.ndarray) -> Array:
    """Flower ``Array`` of ``value``: the very bytes ``np.save`` would write, made without
    ``np.save`` (a cached header plus the raw C-ordered data, copied once)."""
    value = np.asarray(value)
    if not value.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        value = np.copy(value, order="C")
    if value.dtype.hasobject or value.dtype.byteorder == ">":
        return Array(value)
    header = _npy_header(value.dtype.str, value.shape)
    payload = value.data if value.ndim else value.tobytes()
    return _new_array(_dtype_name(value.dtype), tuple(value.shape),
                      b"".join((header, payload)))


def _flower_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """A numpy-typed ``Array`` made by Flower's own constructor."""
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _direct_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """The same ``Array`` with its attributes set directly: Flower's constructor sorts out
    which of its three signatures was used and sets each field through a ``__setattr__``
    that marks the object dirty, about a third of a small model's conversion. Used only
    when :func:`_same_as_flower` found the two equal in this process (Flower's layout)."""
    array = Array.__new__(Array)
    array.__dict__.update({"_is_dirty": True, "dtype": dtype, "shape": shape,
                           "stype": "numpy.ndarray", "data": data})
    return array


def _fill_by_setitem(record: ArrayRecord, key: str, array: Array) -> None:
    record[key] = array


def _fill_directly(record: ArrayRecord, key: str, array: Array) -> None:
    """``record[key] = array`` without the key and value type checks (both are known: a
    ``str`` and an ``Array`` made here); marks the record dirty as ``__setitem__`` does."""
    record.__dict__["_is_dirty"] = True
    record.__dict__["_data"][key] = array


def _same_as_flower() -> bool:
    """Whether the direct construction and fill give the very objects Flower's own
    constructor and ``__setitem__`` give (the same attributes, the same object id when
    deflated); checked once per process, so that another Flower version falls back to the
    constructor instead of building objects it would not."""
    try:
        data = _npy_header("<f4", (2,)) + np.arange(2, dtype="<f4").tobytes()
        slow, fast = ArrayRecord(), ArrayRecord()
        _fill_by_setitem(slow, "w", _flower_array("float32", (2,), data))
        _fill_directly(fast, "w", _direct_array("float32", (2,), data))
        return (type(slow["w"]) is type(fast["w"])
                and vars(slow["w"]) == vars(fast["w"])
                and vars(slow).keys() == vars(fast).keys()
                and slow.__dict__.get("_is_dirty") == fast.__dict__.get("_is_dirty")
                and list(slow) == list(fast)
                and slow.object_id == fast.object_id
                and np.array_equal(fast["w"].numpy(), np.arange(2, dtype="<f4")))
    except Exception:  # noqa: BLE001 - any difference in Flower's internals: the slow path
        return False


DIRECT_RECORDS = _same_as_flower()
"""Whether this process builds ``Array`` / ``ArrayRecord`` objects directly (see above)."""
_new_array = _direct_array if DIRECT_RECORDS else _flower_array
_fill = _fill_directly if DIRECT_RECORDS else _fill_by_setitem


def _from_array(array: Array) -> np.ndarray:
    """numpy copy of a Flower ``Array``; the payload is read directly when its header is
    the one ``np.save`` writes for its dtype and shape, else through ``Array.numpy()``."""
    dtype = np.dtype(array.dtype)
    shape = tuple(int(d) for d in array.shape)
    data = array.data
    if array.stype == "numpy.ndarray" and not dtype.hasobject:
        header = _npy_header(dtype.str, shape)
        if data[: len(header)] == header:
            count = math.prod(shape)
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=len(header))
            return flat.reshape(shape).copy()
    return np.array(array.numpy())


def to_array_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> Flower ArrayRecord (keeps the order)."""
    record = ArrayRecord()  # filled item by item: ArrayRecord(dict) would copy every Array
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"Key must be of type `str` but `{type(k)}` was passed.")
        _fill(record, k, _to_array(v))
    return record


def from_array_record(record: ArrayRecord) -> TensorDict:
    """Flower ArrayRecord -> numpy arrays (keeps the order)."""
    return {k: _from_array(record[k]) for k in record}

"""Packed arrays: fewer Flower objects per message in a deployment.

Flower 1.42 sends a message as a tree of objects, one request each between the
ServerApp, the SuperLink, the SuperNode and the ClientApp: the ``Message``, its
``RecordDict``, every record, and for an ``ArrayRecord`` every ``Array`` *and* each of its
``ArrayChunk`` s. A model of 4 tensors is 9 objects of a train message's 12; on a loopback
federation of 2 cores every object costs a request at each of four hops (issue 10's
probe: 22 object pushes by the ServerApp per round, 12 pulls and 13 pushes per ClientApp
task), and that, not the training, is what a deployed round spends its time on.

:func:`pack` replaces each ``ArrayRecord`` of a message's content by one ``ConfigRecord``
under the key ``PACKED_PREFIX + key`` that holds, in the record's order, every array's
name, dtype, shape, storage type and its bytes (Flower's own serialised buffer, unchanged).
:func:`unpack` rebuilds the same ``ArrayRecord``: every ``Array`` has the same ``dtype``,
``shape``, ``stype`` and ``data`` bytes, so the tensors (and every digest over them) are
bit for bit those sent. A record whose arrays exceed ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``
(5 MB by default; the environment variable ``FEDFORGET_PACK_LIMIT``, in bytes, sets another
limit, and 0 turns packing off) together stays as it is: such a message is not made of many small
objects, and no packed object is ever larger than the largest chunk Flower itself sends.

A client's reply goes further (``pack(content, whole=True)``): when its arrays are at most
``WHOLE_LIMIT`` (1 MiB), the whole content — every record, each as Flower serialises it
(``deflate``) — becomes one ``ConfigRecord`` under :data:`WHOLE_KEY`, so a reply is three
objects (``Message``, ``RecordDict``, that record) instead of five. The server does not do
this for what it sends: the model it sends to every node is one object shared by all the
messages of a round (objects are content-addressed); packed whole, it would be sent once
per node.

Who packs: the deployment Grid's wrapper (:class:`fedforget.engine.polling.PollingGrid`)
packs what it sends to a node that announced it can unpack (``protocol.PACKING`` in its
identify reply — fedforget's client mod does), and unpacks every reply; the client mod
unpacks what it receives before the app's handler runs and packs the reply of a packed
message. A node without the mod, the in-process engine and the simulation never see a
packed record.
"""

from __future__ import annotations

import os
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = ["PACKED_PREFIX", "WHOLE_KEY", "is_packed", "pack", "unpack"]

PACKED_PREFIX = "fedforget.packed:"
"""Key prefix of a packed ``ArrayRecord`` (``"fedforget.packed:arrays"`` for ``"arrays"``)."""

WHOLE_KEY = "fedforget.packed-content"
"""Key of the one ``ConfigRecord`` of a content packed whole (its records' kinds, keys and
serialised bytes)."""

WHOLE_LIMIT = 1 << 20
"""The most array bytes of a content packed whole."""

_NAMES, _DTYPES, _SHAPES, _STYPES, _DATA = "names", "dtypes", "shapes", "stypes", "data"
_KINDS, _KEYS, _BLOBS = "kinds", "keys", "blobs"
_RECORD_KINDS = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}


def _limit() -> int:
    """The largest record packed (bytes): Flower's array chunk size."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    return int(os.environ.get("FEDFORGET_PACK_LIMIT", FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE))


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` holds a packed ``ArrayRecord``."""
    return WHOLE_KEY in content or any(key.startswith(PACKED_PREFIX) for key in content)


def _array_bytes(content: RecordDict) -> int:
    return sum(len(a.data) for r in content.values() if isinstance(r, ArrayRecord)
               for a in r.values())


def pack(content: RecordDict, *, whole: bool = False) -> RecordDict:
    """``content`` with each ``ArrayRecord`` of at most the chunk size packed into one
    ``ConfigRecord`` (the same ``content`` object if there is nothing to pack); with
    ``whole``, a content of at most :data:`WHOLE_LIMIT` array bytes packed into one record."""
    if whole and len(content) > 1 and _array_bytes(content) <= int(
            os.environ.get("FEDFORGET_PACK_WHOLE_LIMIT", WHOLE_LIMIT)):
        kinds: list[str] = []
        for record in content.values():
            kind = next((k for k, cls in _RECORD_KINDS.items() if type(record) is cls), None)
            if kind is None:  # a record type this module does not know: records packed alone
                break
            kinds.append(kind)
        else:
            return RecordDict({WHOLE_KEY: ConfigRecord({
                _KINDS: kinds,
                _KEYS: list(content),
                _BLOBS: [(_packed_arrays(r) if isinstance(r, ArrayRecord) else r).deflate()
                         for r in content.values()],
            })})
    limit = _limit()
    packable = {key for key, record in content.items()
                if isinstance(record, ArrayRecord) and len(record) > 0
                and sum(len(a.data) for a in record.values()) <= limit}
    if not packable:
        return content
    out = RecordDict()
    for key, record in content.items():
        if key not in packable:
            out[key] = record
            continue
        assert isinstance(record, ArrayRecord)
        out[PACKED_PREFIX + key] = _packed_arrays(record)
    return out


def _packed_arrays(record: ArrayRecord) -> ConfigRecord:
    arrays = list(record.items())
    return ConfigRecord({
        _NAMES: [name for name, _ in arrays],
        _DTYPES: [a.dtype for _, a in arrays],
        _SHAPES: [",".join(str(d) for d in a.shape) for _, a in arrays],
        _STYPES: [a.stype for _, a in arrays],
        _DATA: [a.data for _, a in arrays],
    })


def _column(record: ConfigRecord, name: str) -> list[Any]:
    values = record[name]
    if not isinstance(values, list):
        raise TypeError(f"{name!r} is not a list")
    return values


def _unpacked_arrays(key: str, record: object) -> ArrayRecord:
    try:
        if not isinstance(record, ConfigRecord):
            raise TypeError(f"a {type(record).__name__}, not a ConfigRecord")
        columns = [_column(record, c) for c in (_NAMES, _DTYPES, _SHAPES, _STYPES, _DATA)]
        if len({len(c) for c in columns}) != 1:
            raise ValueError("columns of different lengths")
        arrays = ArrayRecord()
        for array_name, dtype, shape, stype, data in zip(*columns, strict=True):
            dims = tuple(int(d) for d in str(shape).split(",") if d != "")
            arrays[str(array_name)] = Array(dtype=str(dtype), shape=dims, stype=str(stype),
                                            data=bytes(data))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"packed record {key!r} is malformed ({exc}); expected the "
                         "columns names, dtypes, shapes, stypes, data of equal "
                         "lengths") from None
    return arrays


def _unpacked_whole(record: object) -> RecordDict:
    out = RecordDict()
    try:
        if not isinstance(record, ConfigRecord):
            raise TypeError(f"a {type(record).__name__}, not a ConfigRecord")
        kinds, keys, blobs = (_column(record, c) for c in (_KINDS, _KEYS, _BLOBS))
        if not len(kinds) == len(keys) == len(blobs):
            raise ValueError("columns of different lengths")
        for kind, key, blob in zip(kinds, keys, blobs, strict=True):
            if kind == "arrays":
                out[str(key)] = _unpacked_arrays(f"{WHOLE_KEY}/{key}",
                                                 ConfigRecord.inflate(bytes(blob)))
            elif kind == "config":
                out[str(key)] = ConfigRecord.inflate(bytes(blob))
            elif kind == "metrics":
                out[str(key)] = MetricRecord.inflate(bytes(blob))
            else:
                raise ValueError(f"unknown record kind {kind!r}")
    except Exception as exc:  # noqa: BLE001 - any undecodable blob is a malformed record
        raise ValueError(f"packed record {WHOLE_KEY!r} is malformed ({exc}); expected the "
                         "columns kinds, keys, blobs of equal lengths") from None
    return out


def unpack(content: RecordDict) -> RecordDict:
    """``content`` with every packed record rebuilt as the record that was packed (the
    whole content, if it was packed whole; the same ``content`` object if none is packed).
    A malformed packed record raises ``ValueError`` naming it."""
    if not is_packed(content):
        return content
    if WHOLE_KEY in content:
        if len(content) != 1:
            raise ValueError(f"packed record {WHOLE_KEY!r} beside other records")
        return _unpacked_whole(content[WHOLE_KEY])
    out = RecordDict()
    for key, record in content.items():
        if not key.startswith(PACKED_PREFIX):
            out[key] = record
            continue
        name = key[len(PACKED_PREFIX):]
        if name in content:
            raise ValueError(f"packed record {key!r} and a record {name!r} in one message")
        out[name] = _unpacked_arrays(key, record)
    return out

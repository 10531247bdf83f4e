r"""What an erasure request asks to forget, and how the clients learn it.

Requests come at three sizes (the ``kind`` of a
:class:`~fedforget.withdrawal.WithdrawalRequest`):

==========  ============================================  ===================================
kind        forgets                                       the client(s) learn it from
==========  ============================================  ===================================
``client``  a whole client (it leaves the federation)      nothing: it is never asked again
``records`` some records of one client (it stays)          its own state: ``forgotten-records
                                                           .json`` in its state directory
``class``   every example of some labels, on every client  the train config: key
                                                           :data:`FORGET_LABELS`
==========  ============================================  ===================================

Everything in force — every record and class request of the run's ledger, whatever its
state — is an :class:`ErasureScope`. From the moment a request is recorded, every round the
clients train (training resumed, replays of ``retrain`` and ``rollback``, a method's own
rounds) is trained without it:

* a client drops the records its state file lists before every training message
  (:func:`client_records`); the server never holds the records, only their ids. In a
  deployment the client writes the file itself when it asks (:func:`add_client_records`);
  in simulation ``fedforget unlearn --records FILE`` writes it into the simulated client's
  state directory (``<run>/client-state/<client>/``), as it does the receipt salt;
* the server puts the forgotten labels in the train config of every message
  (``fedforget.forget-labels = "3"``), recorded in each round record's config; the client
  drops those examples (:func:`labels_of`, :func:`without`).

Because the exclusion is a function of (data, request) and not of the round, a replay with
the run's seeds trains exactly what a run that never had those records (or that class)
would have trained: ``retrain`` and ``rollback`` stay exact at every size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedforget.canonical import canonical_dumps
from fedforget.data.array_dataset import ArrayDataset, record_id_text
from fedforget.errors import ConfigError, FedForgetError
from fedforget.fileio import write_atomic
from fedforget.protocol import FORGET_LABELS

__all__ = [
    "FORGET_LABELS",
    "KINDS",
    "RECORDS_FILE",
    "ErasureError",
    "ErasureScope",
    "add_client_records",
    "client_records",
    "labels_of",
    "labels_text",
    "parse_record_ids",
    "read_record_file",
    "without",
]

KINDS = ("client", "records", "class")
"""The sizes of an erasure request."""

RECORDS_FILE = "forgotten-records.json"
"""The file in a client's state directory that lists the records it no longer trains on."""


class ErasureError(FedForgetError):
    """An erasure request names something that cannot be forgotten as asked."""


# ------------------------------------------------------------------------- scope
@dataclass(frozen=True)
class ErasureScope:
    """Everything forgotten below the level of whole clients.

    Attributes
    ----------
    records : Mapping[str, frozenset[str]]
        Client id -> the ids of its records to forget (text form).
    labels : frozenset[int]
        Labels to forget on every client.
    """

    records: Mapping[str, frozenset[str]] = field(default_factory=dict)
    labels: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.labels) or any(self.records.values())

    def record_clients(self) -> frozenset[str]:
        """The clients some of whose records are forgotten."""
        return frozenset(c for c, ids in self.records.items() if ids)

    def tokens(self) -> frozenset[str]:
        """Names of what is forgotten beyond whole clients, for cache keys:
        ``class:<label>`` and ``records:<client>:<sha256 of its sorted ids>``."""
        out = {f"class:{label}" for label in self.labels}
        for client, ids in self.records.items():
            if ids:
                digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
                out.add(f"records:{client}:{digest}")
        return frozenset(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"labels": [...], "records": {client: count}, "tokens": [...]}``
        (ids not listed: result files are shared more widely than the ledger)."""
        return {"labels": sorted(self.labels),
                "records": {c: len(ids) for c, ids in sorted(self.records.items()) if ids},
                "tokens": sorted(self.tokens())}

    def merge(self, other: ErasureScope) -> ErasureScope:
        """The union of two scopes."""
        records = {c: frozenset(ids) for c, ids in self.records.items()}
        for client, ids in other.records.items():
            records[client] = records.get(client, frozenset()) | frozenset(ids)
        return ErasureScope(records=records, labels=self.labels | other.labels)


# ----------------------------------------------------------------- record ids
def parse_record_ids(values: Iterable[object], *, where: str = "record ids") -> list[str]:
    """Record ids in their text form (decimal digits), sorted and without repeats.

    Raises
    ------
    ErasureError
        An id that is not a non-negative integer, or no id at all.
    """
    out: set[str] = set()
    for value in values:
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit():
            raise ErasureError(f"{where}: {value!r} is not a record id; expected a "
                               "non-negative integer such as 1234")
        out.add(record_id_text(int(text)))
    if not out:
        raise ErasureError(f"{where}: no record id given; expected at least one")
    return sorted(out, key=int)


def read_record_file(path: str | os.PathLike[str]) -> list[str]:
    """The record ids of a file, one per line (blank lines and ``#`` comments ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ErasureError(f"cannot read the record file {str(path)!r}: {exc}") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return parse_record_ids([line for line in lines if line], where=str(path))


# --------------------------------------------------------- the client's state
def add_client_records(state_dir: str | os.PathLike[str], request_id: str,
                       record_ids: Collection[str]) -> Path:
    """Add request ``request_id``'s records to the client's state file (atomically).

    A client writes this when it asks to have its records forgotten (in simulation the
    CLI does it for the simulated client); from then on it trains without them.
    """
    path = Path(state_dir) / RECORDS_FILE
    requests = _read_state(path)
    requests[str(request_id)] = parse_record_ids(record_ids)
    write_atomic(path, canonical_dumps({"requests": requests, "version": 1}))
    return path


def client_records(state_dir: str | os.PathLike[str] | None) -> frozenset[str]:
    """Every record this client asked to forget (empty when it has no state file).

    Read again only when the file changes (it is consulted on every train message).
    """
    if state_dir is None:
        return frozenset()
    path = Path(state_dir) / RECORDS_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return frozenset()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    ids = frozenset(i for ids in _read_state(path).values() for i in ids)
    _cache[path] = (key, ids)
    return ids


_cache: dict[Path, tuple[tuple[int, int], frozenset[str]]] = {}


def _read_state(path: Path) -> dict[str, list[str]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        requests = data["requests"]
        if not isinstance(requests, dict):
            raise TypeError("requests is not an object")
        return {str(k): parse_record_ids(v, where=f"{path} request {k}")
                for k, v in requests.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ErasureError(f"{path} is not a forgotten-records file: {exc}") from None


# ------------------------------------------------------------------- labels
def labels_text(labels: Iterable[int]) -> str:
    """The train-config value of :data:`FORGET_LABELS`: sorted labels, comma-separated."""
    return ",".join(str(int(label)) for label in sorted(set(labels)))


def labels_of(config: Mapping[str, Any] | None) -> frozenset[int]:
    """The labels a train config says to forget (:data:`FORGET_LABELS`; none if absent).

    Raises
    ------
    ConfigError
        A value that is not a comma-separated list of non-negative integers.
    """
    if not config or FORGET_LABELS not in config:
        return frozenset()
    raw = config[FORGET_LABELS]
    parts = [p.strip() for p in str(raw).split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"train config {FORGET_LABELS} = {raw!r}: expected comma-separated "
                          "labels such as '3' or '3,5'")
    return frozenset(int(p) for p in parts)


# ---------------------------------------------------------------- exclusion
def without(data: ArrayDataset, *, records: Collection[str] = frozenset(),
            labels: Collection[int] = frozenset()) -> ArrayDataset:
    """``data`` minus the examples whose record id is in ``records`` or whose label is in
    ``labels`` (``data`` itself when nothing is excluded). The order of the rest is kept.

    Raises
    ------
    ErasureError
        ``records`` is not empty and ``data`` has no record ids.
    """
    if not records and not labels:
        return data
    keep = np.ones(len(data), dtype=bool)
    if labels:
        keep &= ~np.isin(data.y, np.fromiter((int(v) for v in labels), dtype=np.int64))
    if records:
        if data.ids is None:
            raise ErasureError(f"data set {data.name!r} has no record ids, so records "
                               f"{sorted(records)[:3]} cannot be left out")
        wanted = np.fromiter((int(r) for r in records), dtype=np.int64)
        keep &= ~np.isin(data.ids, wanted)
    if keep.all():
        return data
    return data.subset(np.flatnonzero(keep))


def select_records(data: ArrayDataset, records: Collection[str]) -> ArrayDataset:
    """The examples of ``data`` whose record id is in ``records`` (in ``data``'s order)."""
    if data.ids is None:
        raise ErasureError(f"data set {data.name!r} has no record ids")
    wanted = np.fromiter((int(r) for r in records), dtype=np.int64)
    return data.subset(np.flatnonzero(np.isin(data.ids, wanted)),
                       name=f"{data.name}/forgotten-records")

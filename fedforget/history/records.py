"""Round records: what the history store keeps about each training round.

Records are frozen, JSON-serialisable, and have one canonical byte form
(:meth:`RoundRecord.canonical_bytes`: RFC 8785 canonical JSON, see :mod:`fedforget.canonical`)
which becomes a leaf of the history's Merkle tree. Mappings inside records (metrics,
config) are normalised through canonical JSON and held read-only, so that
``from_dict(to_dict(r)) == r`` and equal records have equal bytes.

Wire form (record format 3)::

    {"committed_at": "2025-01-31T12:00:00.000001Z", "config": {...},
     "global_after": "sha256:<hex>", "global_before": "sha256:<hex>",
     "participants": [{"client_id": "client-003", "metrics": {"train-loss": 0.41},
                       "num_examples": 120, "retained": true, "seed": "8174515541398217473",
                       "update_digest": "sha256:<hex>", "weight": 0.25}, ...],
     "refused": [{"client_id": "client-007", "reason": "no reply"}],
     "round": 4, "run": "sha256:<hex of the run context>"}

Seeds are 63-bit integers, beyond the :math:`2^{53}` that a JSON number holds exactly, so
they are written as decimal strings. ``run`` is the SHA-256 of the run context
(:func:`run_context_bytes`: run configuration, roster, codec, retention, creation time and
the initial model's digest), so that every leaf, hence every signed tree head, commits to the
configuration the round was trained under.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, cast

import numpy as np

from fedforget.canonical import canonical_dumps
from fedforget.errors import HistoryError

__all__ = [
    "RECORD_FORMAT",
    "ParticipantRecord",
    "RefusedReply",
    "RoundRecord",
    "canonical_json",
    "is_digest",
    "run_context_bytes",
    "utc_now",
]

RECORD_FORMAT = 3
"""Version of the round-record wire form (1-2: Python's sorted-key JSON, seeds as numbers,
no run context; 3: RFC 8785, seeds as decimal strings, ``run``)."""

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
_SEED = re.compile(r"-?(0|[1-9][0-9]*)", re.ASCII)


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes (see :mod:`fedforget.canonical`).

    Raises
    ------
    HistoryError
        If ``obj`` holds a value RFC 8785 cannot represent (NaN, infinity, an integer
        beyond 2**53 - 1, an arbitrary object).
    """
    try:
        return canonical_dumps(obj)
    except (TypeError, ValueError) as exc:
        raise HistoryError(f"value cannot be recorded as canonical JSON: {exc}") from exc


def run_context_bytes(
    *,
    run_config: Mapping[str, Any],
    codec: str,
    retain_interval: int,
    roster: Iterable[str],
    initial_model: str,
    created_at: str,
    recording: Mapping[str, Any] | None = None,
) -> bytes:
    """The canonical bytes of a run's context, whose SHA-256 every round record carries.

    .. code-block:: json

        {"codec": "fp32", "created-at": "2025-01-31T12:00:00.000001Z",
         "format": "fedforget-run-context/v1", "initial-model": "sha256:..",
         "recording": null, "retain-interval": 1, "roster": ["client-000", ...],
         "run-config": {...}}

    ``recording`` is the meta table's ``recording`` entry (how the run is sampled, seeded
    and stored), when the store has one.

    Raises
    ------
    HistoryError
        If a value cannot be written as canonical JSON.
    """
    return canonical_json(
        {
            "format": "fedforget-run-context/v1",
            "run-config": dict(run_config),
            "codec": codec,
            "retain-interval": retain_interval,
            "roster": sorted(set(roster)),
            "initial-model": initial_model,
            "created-at": created_at,
            "recording": None if recording is None else dict(recording),
        }
    )


def is_digest(value: object) -> bool:
    """Whether ``value`` reads ``"sha256:"`` followed by 64 lower-case hex digits."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def utc_now() -> str:
    """The current time as RFC 3339 UTC with microseconds, e.g. ``2025-01-31T12:00:00.000001Z``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _frozen_json_mapping(value: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise HistoryError(f"{what} is a {type(value).__name__}; expected a mapping")
    for key in value:
        if not isinstance(key, str):
            raise HistoryError(f"{what} has key {key!r}; expected string keys")
    try:
        normalised = json.loads(canonical_json(dict(value)))
    except HistoryError as exc:
        raise HistoryError(f"{what} cannot be recorded: {exc}") from exc
    return MappingProxyType(normalised)


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _require_int(value: object, what: str, minimum: int | None = None) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HistoryError(f"{what} is {value!r}; expected an integer")
    if minimum is not None and value < minimum:
        raise HistoryError(f"{what} is {value}; expected at least {minimum}")
    return value


def _require_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise HistoryError(f"{what} is {value!r}; expected a number")
    number = float(value)
    if not math.isfinite(number):
        raise HistoryError(f"{what} is {number}; expected a finite number")
    return number


def _require_client_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise HistoryError(f"{what} is {value!r}; expected a non-empty string")
    return value


def _require_digest(value: object, what: str) -> str:
    if not is_digest(value):
        raise HistoryError(f"{what} is {value!r}; expected 'sha256:' and 64 lower-case hex digits")
    return cast(str, value)


def _check_keys(data: Mapping[str, Any], expected: Iterable[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise HistoryError(f"{what} is a {type(data).__name__}; expected a mapping")
    expected_set = set(expected)
    if set(data) != expected_set:
        raise HistoryError(f"{what} has keys {sorted(data)}; expected {sorted(expected_set)}")


class _Record:
    """Shared behaviour: canonical bytes, hashing by content, pickling through dicts."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def canonical_bytes(self) -> bytes:
        """The record as canonical JSON (sorted keys, compact, UTF-8)."""
        return canonical_json(self.to_dict())

    def __hash__(self) -> int:
        return hash(self.canonical_bytes())

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return (type(self).from_dict, (self.to_dict(),))  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True, eq=True)
class ParticipantRecord(_Record):
    """One client's contribution to a round.

    Attributes
    ----------
    client_id
        Stable pseudonymous id such as ``"client-003"`` (never a Flower node id).
    num_examples
        :math:`n_k`, the number of training examples the client reported.
    weight
        Aggregation weight actually used (:math:`n_k / \\sum_j n_j` for FedAvg).
    update_digest
        Digest of ``encode(update, codec)`` under the run's codec, recorded every round.
    retained
        Whether the update blob is stored (retention interval Δt).
    metrics
        Numeric metrics the client reported, e.g. ``{"train-loss": 0.41}``.
    seed
        Seed the client trained with this round.
    """

    client_id: str
    num_examples: int
    weight: float
    update_digest: str
    retained: bool
    metrics: Mapping[str, float]
    seed: int

    __hash__ = _Record.__hash__

    def __post_init__(self) -> None:
        who = f"participant {self.client_id!r}"
        _require_client_id(self.client_id, "participant client_id")
        _set(self, "num_examples", _require_int(self.num_examples, f"{who} num_examples", 0))
        _set(self, "weight", _require_float(self.weight, f"{who} weight"))
        _require_digest(self.update_digest, f"{who} update_digest")
        if not isinstance(self.retained, bool | np.bool_):
            raise HistoryError(f"{who} retained is {self.retained!r}; expected a bool")
        _set(self, "retained", bool(self.retained))
        if not isinstance(self.metrics, Mapping):
            raise HistoryError(f"{who} metrics is {self.metrics!r}; expected a mapping")
        metrics = {
            _require_client_id(k, f"{who} metric name"): _require_float(v, f"{who} metric {k!r}")
            for k, v in self.metrics.items()
        }
        if all(k.isascii() for k in metrics):
            # ASCII names and finite floats come back from canonical JSON unchanged: the
            # round trip of _frozen_json_mapping would give this very mapping.
            _set(self, "metrics", MappingProxyType(dict(sorted(metrics.items()))))
        else:
            _set(self, "metrics", _frozen_json_mapping(metrics, f"{who} metrics"))
        _set(self, "seed", _require_int(self.seed, f"{who} seed"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the record."""
        return {
            "client_id": self.client_id,
            "num_examples": self.num_examples,
            "weight": self.weight,
            "update_digest": self.update_digest,
            "retained": self.retained,
            "metrics": dict(self.metrics),
            "seed": str(self.seed),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParticipantRecord:
        """Inverse of :meth:`to_dict`; refuses missing or unknown keys.

        ``seed`` must be a decimal string (format 3); a number is refused, since a 63-bit
        seed does not survive a JSON number.
        """
        _check_keys(data, _PARTICIPANT_KEYS, "participant record")
        seed = data["seed"]
        if not isinstance(seed, str) or _SEED.fullmatch(seed) is None:
            raise HistoryError(
                f"participant {data.get('client_id')!r} seed is {seed!r}; expected a decimal "
                "string such as '8174515541398217473' (record format 3)"
            )
        return cls(**{**data, "seed": int(seed)})


@dataclass(frozen=True, slots=True, eq=True)
class RefusedReply(_Record):
    """A client reply the server refused this round (NaN values, wrong shapes, timeout...)."""

    client_id: str
    reason: str

    __hash__ = _Record.__hash__

    def __post_init__(self) -> None:
        _require_client_id(self.client_id, "refused reply client_id")
        if not isinstance(self.reason, str):
            raise HistoryError(
                f"refused reply of {self.client_id!r} has reason {self.reason!r}; expected str"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the record."""
        return {"client_id": self.client_id, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RefusedReply:
        """Inverse of :meth:`to_dict`; refuses missing or unknown keys."""
        _check_keys(data, ("client_id", "reason"), "refused reply")
        return cls(**data)


@dataclass(frozen=True, slots=True, eq=True)
class RoundRecord(_Record):
    """Everything recorded about training round ``round``.

    Participants and refused replies are kept sorted by ``client_id`` (the order in which
    aggregation sums, so that float summation order is fixed); a client appears at most once.

    Attributes
    ----------
    round
        1-based round number t.
    global_before
        fp32 digest of :math:`\\theta_t`, the global model sent out.
    global_after
        fp32 digest of the aggregated :math:`\\theta_{t+1}`.
    participants
        Accepted contributions, sorted by client id.
    refused
        Refused replies, sorted by client id.
    config
        Train config sent to the clients (``learning-rate``, ``local-epochs``, ...).
    committed_at
        RFC 3339 UTC time at which the round was committed.
    run_digest
        SHA-256 of the run context the round was trained under
        (:func:`run_context_bytes`); keyword-only. Written as ``run``.
    """

    round: int
    global_before: str
    global_after: str
    participants: tuple[ParticipantRecord, ...]
    refused: tuple[RefusedReply, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    committed_at: str = field(default_factory=utc_now)
    run_digest: str = field(kw_only=True)
    # canonical_bytes(), computed once: the store writes them and the server's tree head
    # hashes them, for every round (the record is immutable).
    _canonical: bytes | None = field(default=None, init=False, repr=False, compare=False)

    __hash__ = _Record.__hash__

    def canonical_bytes(self) -> bytes:
        """The record as canonical JSON (sorted keys, compact, UTF-8), computed once."""
        cached = self._canonical
        if cached is None:
            cached = canonical_json(self.to_dict())
            _set(self, "_canonical", cached)
        return cached

    def __post_init__(self) -> None:
        t = _require_int(self.round, "round number", 1)
        _set(self, "round", t)
        _require_digest(self.global_before, f"round {t} global_before")
        _require_digest(self.global_after, f"round {t} global_after")
        _require_digest(self.run_digest, f"round {t} run (the run context digest)")
        participants = tuple(self.participants)
        for p in participants:
            if not isinstance(p, ParticipantRecord):
                raise HistoryError(f"round {t} participant {p!r} is not a ParticipantRecord")
        refused = tuple(self.refused)
        for r in refused:
            if not isinstance(r, RefusedReply):
                raise HistoryError(f"round {t} refused reply {r!r} is not a RefusedReply")
        seen: set[str] = set()
        for cid in [p.client_id for p in participants] + [r.client_id for r in refused]:
            if cid in seen:
                raise HistoryError(
                    f"round {t} lists client {cid!r} more than once; expected each client "
                    "once, as a participant or as refused"
                )
            seen.add(cid)
        _set(self, "participants", tuple(sorted(participants, key=lambda p: p.client_id)))
        _set(self, "refused", tuple(sorted(refused, key=lambda r: r.client_id)))
        _set(self, "config", _frozen_json_mapping(self.config, f"round {t} config"))
        if not isinstance(self.committed_at, str) or not _RFC3339_UTC.fullmatch(self.committed_at):
            raise HistoryError(
                f"round {t} committed_at is {self.committed_at!r}; expected RFC 3339 UTC "
                "such as '2025-01-31T12:00:00.000001Z'"
            )

    def participant(self, client_id: str) -> ParticipantRecord:
        """The record of ``client_id`` in this round.

        Raises
        ------
        HistoryError
            If the client did not participate in this round.
        """
        for p in self.participants:
            if p.client_id == client_id:
                return p
        raise HistoryError(f"client {client_id!r} did not participate in round {self.round}")

    @property
    def client_ids(self) -> tuple[str, ...]:
        """Ids of the participating clients, sorted."""
        return tuple(p.client_id for p in self.participants)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the record."""
        return {
            "round": self.round,
            "global_before": self.global_before,
            "global_after": self.global_after,
            "participants": [p.to_dict() for p in self.participants],
            "refused": [r.to_dict() for r in self.refused],
            "config": json.loads(canonical_json(dict(self.config))),
            "committed_at": self.committed_at,
            "run": self.run_digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_dict`; refuses missing or unknown keys."""
        _check_keys(data, _ROUND_KEYS, "round record")
        return cls(
            round=data["round"],
            global_before=data["global_before"],
            global_after=data["global_after"],
            participants=tuple(ParticipantRecord.from_dict(p) for p in data["participants"]),
            refused=tuple(RefusedReply.from_dict(r) for r in data["refused"]),
            config=data["config"],
            committed_at=data["committed_at"],
            run_digest=data["run"],
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundRecord:
        """Parse canonical bytes written by :meth:`canonical_bytes`.

        Raises
        ------
        HistoryError
            If the bytes are not valid JSON of a round record.
        """
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HistoryError(f"round record bytes are not UTF-8 JSON: {exc}") from exc
        return cls.from_dict(parsed)


_PARTICIPANT_KEYS = (
    "client_id",
    "num_examples",
    "weight",
    "update_digest",
    "retained",
    "metrics",
    "seed",
)
_ROUND_KEYS = (
    "round",
    "global_before",
    "global_after",
    "participants",
    "refused",
    "config",
    "committed_at",
    "run",
)

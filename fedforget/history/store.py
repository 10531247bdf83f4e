"""The embedded history store: an SQLite index plus content-addressed tensor blobs.

Layout of a run directory (format version 3)::

    <directory>/history.sqlite               index (WAL journal, synchronous=FULL)
    <directory>/blobs/<round>-<token>.pack   the new blobs of one commit, concatenated

Format 3 (this version): round records, the run context and the withdrawal log are RFC 8785
canonical JSON; every round record carries the digest of the run context (run
configuration, roster, codec, retention, initial model), frozen when round 1 commits; the
withdrawal requests are mirrored, by SQLite triggers, into an append-only event log
(``withdrawal_events``) whose events are the leaves of the ledger's Merkle tree. Stores of
formats 1 and 2 are refused with a message saying so.

A *blob* is one encoded tensor dict (:func:`fedforget.tensors.encode`), named by the SHA-256
of its bytes (content addressing: a blob already stored is never written again). The blobs
first stored by one commit (round ``t``'s retained updates, then its global model; the
initial model for round 0) are appended to one *pack* file, so that a round costs one file, one
fsync of it and one of its directory, whatever the number of clients. The index maps each
digest to its pack, offset and length. A pack is written once, never modified, and holds
nothing but whole blobs (each starts with the encoding's magic and header, so a pack can be
split without its index).

For round t the store keeps the :class:`~fedforget.history.records.RoundRecord` (its canonical
bytes and their SHA-256, the future Merkle leaf), the aggregated global model
:math:`\\theta_{t+1}` in fp32 (lossless, so exact methods can restore it), and each client's
update :math:`\\Delta_{t,k} = \\theta_{t,k} - \\theta_t` under the run's codec when t is a
retained round. Following FedEraser (Liu et al., IWQoS 2021,
https://arxiv.org/abs/2012.13891), the retained rounds are

.. math:: t \\in \\{1,\\ 1 + \\Delta t,\\ 1 + 2\\Delta t,\\ \\dots\\}

Update digests are recorded every round, retained or not.

Atomicity: a round's pack is written under a new unique name and fsync'ed (with its
directory) before the round's index rows are inserted in one SQLite transaction. A crash at
any instant leaves the store at the last committed round; the pack of an uncommitted round is
an unreferenced orphan, harmless, and the round is written to a new pack when committed
again. Every blob read is checked against its length and digest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fedforget.errors import ConfigError, HistoryError, IntegrityError
from fedforget.fileio import StorageError, fsync_directory, storage_error
from fedforget.history.commitment import (
    Commitment,
    LoggedHead,
    commitment_of,
    compare_heads,
    read_head_log,
    spans,
)
from fedforget.history.mappings import release_mappings
from fedforget.history.records import (
    ParticipantRecord,
    RefusedReply,
    RoundRecord,
    canonical_json,
    run_context_bytes,
    utc_now,
)
from fedforget.history.wal import (
    WAL_SUFFIX,
    WalReport,
    analyse_wal,
    database_image,
    open_image,
)
from fedforget.lock import LOCK_FILENAME
from fedforget.rundir import HEADS_FILE
from fedforget.tensors import CODECS, decode, encode, sha256_digest

log = logging.getLogger("fedforget.history")

__all__ = [
    "BLOB_DIRNAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILENAME",
    "PACK_SUFFIX",
    "BlobLocation",
    "HistoryStore",
    "ParticipantUpdate",
    "PreparedRound",
    "blob_location",
]

FORMAT_NAME = "fedforget-history"
"""Value of ``meta.format`` in every history index."""

FORMAT_VERSION = 3
"""Version of the index schema and blob layout written and read by this module (1: one file
per blob, ``blobs/<hh>/<hex>``; 2: one pack file per commit; 3: RFC 8785 records bound to
the run context, withdrawal event log)."""

INDEX_FILENAME = "history.sqlite"
BLOB_DIRNAME = "blobs"
PACK_SUFFIX = ".pack"

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,        -- 'sha256:<hex>' of the blob's bytes
    pack   TEXT NOT NULL,           -- name of the pack file in blobs/ that holds it
    offset INTEGER NOT NULL,        -- where the blob starts in the pack
    nbytes INTEGER NOT NULL         -- its length
);
CREATE TABLE models (
    round  INTEGER PRIMARY KEY,     -- 0 is the initial model, t >= 1 the global model after round t
    digest TEXT NOT NULL REFERENCES blobs (digest)
);
CREATE TABLE rounds (
    round         INTEGER PRIMARY KEY,
    global_before TEXT NOT NULL,
    global_after  TEXT NOT NULL,
    record        BLOB NOT NULL,    -- RoundRecord.canonical_bytes()
    record_digest TEXT NOT NULL,    -- 'sha256:<hex>' of record
    committed_at  TEXT NOT NULL
);
CREATE TABLE participants (
    round         INTEGER NOT NULL REFERENCES rounds (round),
    client_id     TEXT NOT NULL,
    num_examples  INTEGER NOT NULL,
    weight        REAL NOT NULL,
    update_digest TEXT NOT NULL,
    retained      INTEGER NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE INDEX participants_by_client ON participants (client_id, round);
CREATE TABLE withdrawals (
    request_id  TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL,
    reason      TEXT NOT NULL,
    state       TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    method      TEXT,
    detail      TEXT,
    params      TEXT,
    ordered_at  TEXT
);
CREATE TABLE erasures (
    request_id  TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,        -- 'records' or 'class'
    client_id   TEXT NOT NULL,
    scope       TEXT NOT NULL,        -- JSON: the record ids or the labels
    received_at TEXT NOT NULL,
    reason      TEXT NOT NULL,
    state       TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    method      TEXT,
    detail      TEXT,
    params      TEXT,
    ordered_at  TEXT
);
CREATE TABLE withdrawal_events (
    seq         INTEGER PRIMARY KEY,  -- 1, 2, 3, ...: leaf seq - 1 of the ledger tree
    request_id  TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    received_at TEXT NOT NULL,
    reason      TEXT NOT NULL,
    state       TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    method      TEXT,
    detail      TEXT,
    params      TEXT,
    ordered_at  TEXT,
    kind        TEXT NOT NULL,        -- 'client' (withdrawals), 'records' or 'class' (erasures)
    scope       TEXT
);
CREATE TRIGGER withdrawals_logged_on_insert AFTER INSERT ON withdrawals BEGIN
    INSERT INTO withdrawal_events (request_id, client_id, received_at, reason, state,
                                   updated_at, method, detail, params, ordered_at, kind, scope)
    VALUES (NEW.request_id, NEW.client_id, NEW.received_at, NEW.reason, NEW.state,
            NEW.updated_at, NEW.method, NEW.detail, NEW.params, NEW.ordered_at, 'client',
            NULL);
END;
CREATE TRIGGER withdrawals_logged_on_update AFTER UPDATE ON withdrawals BEGIN
    INSERT INTO withdrawal_events (request_id, client_id, received_at, reason, state,
                                   updated_at, method, detail, params, ordered_at, kind, scope)
    VALUES (NEW.request_id, NEW.client_id, NEW.received_at, NEW.reason, NEW.state,
            NEW.updated_at, NEW.method, NEW.detail, NEW.params, NEW.ordered_at, 'client',
            NULL);
END;
CREATE TRIGGER withdrawals_never_deleted BEFORE DELETE ON withdrawals BEGIN
    SELECT RAISE(ABORT, 'withdrawal requests are never deleted');
END;
CREATE TRIGGER erasures_logged_on_insert AFTER INSERT ON erasures BEGIN
    INSERT INTO withdrawal_events (request_id, client_id, received_at, reason, state,
                                   updated_at, method, detail, params, ordered_at, kind, scope)
    VALUES (NEW.request_id, NEW.client_id, NEW.received_at, NEW.reason, NEW.state,
            NEW.updated_at, NEW.method, NEW.detail, NEW.params, NEW.ordered_at, NEW.kind,
            NEW.scope);
END;
CREATE TRIGGER erasures_logged_on_update AFTER UPDATE ON erasures BEGIN
    INSERT INTO withdrawal_events (request_id, client_id, received_at, reason, state,
                                   updated_at, method, detail, params, ordered_at, kind, scope)
    VALUES (NEW.request_id, NEW.client_id, NEW.received_at, NEW.reason, NEW.state,
            NEW.updated_at, NEW.method, NEW.detail, NEW.params, NEW.ordered_at, NEW.kind,
            NEW.scope);
END;
CREATE TRIGGER erasures_never_deleted BEFORE DELETE ON erasures BEGIN
    SELECT RAISE(ABORT, 'erasure requests are never deleted');
END;
CREATE TRIGGER withdrawal_events_never_updated BEFORE UPDATE ON withdrawal_events BEGIN
    SELECT RAISE(ABORT, 'the withdrawal event log is append-only');
END;
CREATE TRIGGER withdrawal_events_never_deleted BEFORE DELETE ON withdrawal_events BEGIN
    SELECT RAISE(ABORT, 'the withdrawal event log is append-only');
END;
"""



def _statements(script: str) -> Iterator[str]:
    """The complete SQL statements of ``script`` (triggers hold ``;`` of their own)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        raise HistoryError(f"incomplete SQL statement in the schema: {buffer.strip()!r}")


@contextlib.contextmanager
def _guard_sqlite(index: Path, action: str, consequence: str = "") -> Iterator[None]:
    """Turn the operating system's and SQLite's storage refusals into a StorageError."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "disk is full" in text or "disk full" in text:
            raise storage_error(OSError(errno.ENOSPC, "disk full"), index, action,
                                consequence) from exc
        if "readonly" in text or "read-only" in text:
            raise storage_error(OSError(errno.EROFS, "read-only"), index, action,
                                consequence) from exc
        if "disk i/o error" in text:
            raise storage_error(OSError(errno.EIO, "I/O error"), index, action,
                                consequence) from exc
        if "unable to open" in text:
            raise storage_error(OSError(errno.EACCES, "cannot open"), index, action,
                                consequence) from exc
        raise HistoryError(f"cannot {action} {index}: {exc}") from exc
    except OSError as exc:
        raise storage_error(exc, index, action, consequence) from exc


_KEEP_ENCODED_BYTES = 256 << 20
_WRITE_BUFFER = 1 << 20
_SQL_VARIABLES = 500  # digests per "IN (...)" query, well under SQLite's limit


@dataclass(frozen=True, slots=True)
class BlobLocation:
    """Where a blob is stored: bytes ``offset .. offset + nbytes`` of the file ``path``."""

    digest: str
    path: Path
    offset: int
    nbytes: int

    def __str__(self) -> str:
        return f"bytes {self.offset}..{self.offset + self.nbytes} of {self.path}"


def blob_location(directory: str | os.PathLike[str], digest: str) -> BlobLocation:
    """Where the blob named by ``digest`` (``"sha256:<hex>"``) is stored in a run directory.

    Raises
    ------
    HistoryError
        If the directory is not a store or its index lists no such blob.
    """
    with HistoryStore.open(directory) as store:
        return store.blob_location(digest)


def _pack_name(round: int) -> str:
    """A new pack file name for the blobs first stored by the commit of ``round``."""
    return f"{round:06d}-{secrets.token_hex(6)}{PACK_SUFFIX}"


def _read_range(location: BlobLocation, where: str) -> bytes:
    """The bytes of the blob at ``location``, checked for length and SHA-256 (an index row
    with an impossible offset or length, e.g. a flipped ``blobs.offset``, is an
    IntegrityError naming the file, not an exception of the file API)."""
    if location.offset < 0 or location.nbytes < 0:
        raise IntegrityError(
            f"{where}: the index places blob {location.digest} at offset {location.offset}, "
            f"length {location.nbytes} in {location.path}: impossible (the index is damaged)"
        )
    try:
        with open(location.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if location.offset + location.nbytes > size:
                present = max(0, min(location.nbytes, size - location.offset))
                raise IntegrityError(
                    f"{where}: blob {location} is truncated: {present} of "
                    f"{location.nbytes} bytes present"
                )
            f.seek(location.offset)
            data = f.read(location.nbytes)
    except FileNotFoundError:
        raise IntegrityError(
            f"{where}: blob {location} is missing: the file does not exist "
            f"(expected {location.digest})"
        ) from None
    except (OSError, ValueError, OverflowError) as exc:
        raise IntegrityError(f"{where}: blob {location} cannot be read: {exc}") from exc
    if len(data) != location.nbytes:
        raise IntegrityError(
            f"{where}: blob {location} is truncated: {len(data)} of {location.nbytes} bytes "
            "present"
        )
    found = "sha256:" + hashlib.sha256(data).hexdigest()
    if found != location.digest:
        raise IntegrityError(
            f"{where}: blob {location} is altered: its SHA-256 is {found}, expected "
            f"{location.digest}"
        )
    return data


_fsync_directory = fsync_directory


def _connect(index: Path, *, create: bool, fsync: bool = True) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    uri = f"file:{urllib.parse.quote(str(index))}?mode={mode}"
    # check_same_thread=False: a background writer thread may commit rounds; callers
    # use one store from one thread at a time (HistoryRecording serialises its commits).
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)

    def text(data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntegrityError(
                f"{index} holds a text value that is not UTF-8 ({exc}): the index is "
                "damaged; `fedforget history verify` names what"
            ) from None

    conn.text_factory = text
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _read_meta(conn: sqlite3.Connection, directory: Path) -> dict[str, str]:
    """Read and check the meta table; raise HistoryError if this is not a usable store."""
    index = directory / INDEX_FILENAME
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        raise HistoryError(f"{index} is not a history index: {exc}") from exc
    if meta.get("format") != FORMAT_NAME:
        raise HistoryError(
            f"{index} is not a history index: meta format is {meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r}"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        found = meta.get("format_version")
        why = {
            "1": " (version 1 stores, one file per blob, were written before packs)",
            "2": " (version 2 stores hash their records as Python's sorted-key JSON, not "
                 "RFC 8785, and do not bind the run context or the withdrawal ledger to "
                 "the signed tree heads)",
        }.get(str(found), "")
        raise HistoryError(
            f"{index} has format version {found!r}; this fedforget reads version "
            f"{FORMAT_VERSION} only{why}; train the run again into a new directory"
        )
    missing = [k for k in ("codec", "retain_interval", "run_config", "created_at") if k not in meta]
    if missing:
        raise HistoryError(f"{index} lacks meta keys {missing}")
    if meta["codec"] not in CODECS:
        raise HistoryError(
            f"{index} records codec {meta['codec']!r}; expected one of {', '.join(CODECS)}"
        )
    return meta


def _refuse_lost_commits(directory: Path, snapshot: sqlite3.Connection, wal: WalReport) -> None:
    """Refuse a store whose write-ahead log lost committed transactions (see ``open``).

    ``snapshot`` is the store as a reader sees it. A damaged log is always refused; a torn
    last commit frame only when a signed head in the run directory covers more rounds or
    withdrawal events than the snapshot holds (else it is a write a crash interrupted before
    it committed, which SQLite discards, as it should).
    """
    if wal.damage is None and wal.torn_commit is None:
        return
    readable = commitment_of(snapshot)
    heads, _ = read_head_log(directory / HEADS_FILE)
    signed = max((h.head.size for h in heads), default=0)
    signed_ledger = max((h.head.ledger_size for h in heads), default=0)
    lost: list[str] = []
    if signed > readable.size:
        lost.append(f"rounds {readable.size + 1}-{signed} are covered by a signed tree head "
                    f"in {directory / HEADS_FILE} (size {signed})")
    if signed_ledger > readable.ledger_size:
        lost.append(f"withdrawal events {readable.ledger_size + 1}-{signed_ledger} are "
                    f"covered by a signed tree head (ledger size {signed_ledger})")
    if wal.damage is None and not lost:
        log.warning(
            "%s: its last commit frame is torn (a write interrupted by a crash before it "
            "committed); SQLite discards it and the store stays at round %d",
            wal.path, readable.size,
        )
        return
    held = ""
    try:
        image, _ = database_image(directory / INDEX_FILENAME, wal, through_damage=True)
        with contextlib.closing(open_image(image)) as beyond:
            rounds = [t for (t,) in beyond.execute("SELECT round FROM rounds ORDER BY round")
                      if t > readable.size]
        if rounds:
            held = f"; the frames past the damage hold rounds {spans(rounds)}"
    except (sqlite3.Error, HistoryError, OSError):
        pass  # the damaged part cannot be read: say what is certain only
    damage = wal.damage or wal.torn_commit
    assert damage is not None
    affected = "; ".join(lost) if lost else (
        f"committed transactions after round {readable.size} may be affected")
    raise IntegrityError(
        f"refusing to use the history in {directory}: {damage.describe(wal.path)}. The "
        f"readable store holds rounds 1-{readable.size} and {readable.ledger_size} withdrawal "
        f"event(s); {affected}{held}. Reading on would shorten the history without a word "
        "and a resumed run would sign a second root for sizes already signed. Restore "
        f"{wal.path.name} and {INDEX_FILENAME} from a backup, or train into a new directory."
    )


def _retained(t: int, retain_interval: int) -> bool:
    return t >= 1 and (t - 1) % retain_interval == 0


@dataclass(frozen=True, slots=True)
class ParticipantUpdate:
    """One accepted client reply, as handed to :meth:`HistoryStore.commit_round`.

    Attributes
    ----------
    client_id
        Stable pseudonymous client id (``"client-003"``).
    num_examples
        :math:`n_k`.
    weight
        Aggregation weight used for this client.
    seed
        Seed the client trained with this round.
    update
        :math:`\\Delta_{t,k} = \\theta_{t,k} - \\theta_t`, same keys and shapes as the model.
    metrics
        Numeric metrics the client reported (``{"train-loss": 0.41}``).
    """

    client_id: str
    num_examples: int
    weight: float
    seed: int
    update: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreparedRound:
    """A round validated, encoded and hashed by :meth:`HistoryStore.prepare_round`, ready
    for :meth:`HistoryStore.write_round`; nothing of it is stored yet.

    Attributes
    ----------
    record
        The round's record (digests, participants, config, time), canonical bytes computed.
    model_data
        The encoded global model θ_{t+1} (fp32).
    updates
        The participants whose updates are stored (all of them in a retained round, else
        none), in the order given.
    encoded
        Client id -> encoded update, for those kept encoded (see ``_KEEP_ENCODED_BYTES``).
    codec
        The codec the updates were encoded with.
    """

    record: RoundRecord
    model_data: bytes
    updates: tuple[ParticipantUpdate, ...]
    encoded: Mapping[str, bytes]
    codec: str


class HistoryStore:
    """Append-only per-round training history of one federated run.

    Use :meth:`create` for a new run and :meth:`open` for an existing one; both return an
    open store, usable as a context manager. One process should write to a store at a time.

    Examples
    --------
    >>> store = HistoryStore.create(run_dir, run_config={"seed": 0}, retain_interval=2)
    >>> theta0 = store.put_initial_model(initial_tensors)
    >>> store.commit_round(round=1, global_before=theta0, global_after=new_tensors,
    ...                    participants=[ParticipantUpdate(...)], config={"local-epochs": 1})
    """

    def __init__(
        self,
        directory: Path,
        conn: sqlite3.Connection,
        meta: Mapping[str, str],
        *,
        fsync: bool = True,
        read_only: bool = False,
    ) -> None:
        self._directory = directory
        self._blob_root = os.path.join(directory, BLOB_DIRNAME)
        self._fsync = fsync
        self._conn: sqlite3.Connection | None = conn
        self._codec = meta["codec"]
        self._created_at = meta["created_at"]
        self._read_only = read_only
        try:
            self._retain_interval = int(meta["retain_interval"])
            self._run_config_json = meta["run_config"]
            json.loads(self._run_config_json)
            self._roster_meta: tuple[str, ...] = tuple(json.loads(meta.get("roster", "[]")))
        except (ValueError, TypeError) as exc:
            raise HistoryError(
                f"{directory / INDEX_FILENAME} has a corrupt meta table: {exc}"
            ) from exc
        context = meta.get("run_context")
        self._run_context: bytes | None = None if context is None else context.encode("utf-8")
        row = conn.execute("SELECT digest FROM models WHERE round = 0").fetchone()
        self._initial_digest: str | None = None if row is None else str(row[0])
        if self._retain_interval < 1:
            raise HistoryError(
                f"{directory / INDEX_FILENAME} records retain_interval "
                f"{self._retain_interval}; expected >= 1"
            )

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        run_config: Mapping[str, Any],
        codec: str = "fp32",
        retain_interval: int = 1,
        fsync: bool = True,
    ) -> HistoryStore:
        """Create a new, empty store in ``directory`` (created if absent, else must be empty).

        Parameters
        ----------
        directory
            Run directory.
        run_config
            The run's configuration (JSON-serialisable), kept in the meta table.
        codec
            Codec of stored client updates, one of :data:`fedforget.tensors.CODECS`. Global
            models are always stored in fp32.
        retain_interval
            Δt: client updates of rounds 1, 1 + Δt, 1 + 2Δt, ... are stored.
        fsync
            True (default): blobs and the index are fsync'ed before a round counts as
            committed, so a round survives a power loss. False: no fsync of blobs and SQLite
            ``synchronous=NORMAL``; commits stay atomic against a crash of the process
            (SIGKILL) but the last rounds may be lost or damaged by an OS crash or power loss.
            For simulations, where a run can be repeated.

        Raises
        ------
        ConfigError
            On an unknown codec, a retain_interval below 1 or a run_config that is not JSON.
        HistoryError
            If ``directory`` exists and is not an empty directory.
        """
        if codec not in CODECS:
            raise ConfigError(f"codec is {codec!r}; expected one of {', '.join(CODECS)}")
        if not isinstance(retain_interval, int) or isinstance(retain_interval, bool):
            raise ConfigError(f"retain_interval is {retain_interval!r}; expected an integer >= 1")
        if retain_interval < 1:
            raise ConfigError(f"retain_interval is {retain_interval}; expected an integer >= 1")
        if not isinstance(run_config, Mapping):
            raise ConfigError(f"run_config is a {type(run_config).__name__}; expected a mapping")
        try:
            run_config_json = canonical_json(dict(run_config)).decode("utf-8")
        except HistoryError as exc:
            raise ConfigError(f"run_config cannot be stored: {exc}") from exc

        path = Path(directory)
        if path.exists():
            if not path.is_dir():
                raise HistoryError(f"cannot create a history store at {path}: not a directory")
            if any(p.name != LOCK_FILENAME for p in path.iterdir()):
                what = "a history store" if (path / INDEX_FILENAME).exists() else "other files"
                raise HistoryError(
                    f"refusing to create a history store in {path}: the directory is not "
                    f"empty (it holds {what}); expected a new or empty directory"
                )
        existed = path.exists()
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "created_at": utc_now(),
            "codec": codec,
            "retain_interval": str(retain_interval),
            "run_config": run_config_json,
        }
        index = path / INDEX_FILENAME
        conn: sqlite3.Connection | None = None
        try:
            with _guard_sqlite(index, "create the history index",
                               "nothing of the store was left behind"):
                path.mkdir(parents=True, exist_ok=True)
                (path / BLOB_DIRNAME).mkdir(exist_ok=True)
                conn = _connect(index, create=True, fsync=fsync)
                conn.execute("BEGIN IMMEDIATE")
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
                conn.execute("COMMIT")
                if fsync:
                    fsync_directory(path)
        except BaseException:
            if conn is not None:
                conn.close()
            # Nothing half-written: remove what this call created.
            for name in (INDEX_FILENAME, INDEX_FILENAME + "-wal", INDEX_FILENAME + "-shm"):
                with contextlib.suppress(OSError):
                    (path / name).unlink()
            with contextlib.suppress(OSError):
                (path / BLOB_DIRNAME).rmdir()
            if not existed:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return cls(path, conn, meta, fsync=fsync)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        read_only: bool = False,
    ) -> HistoryStore:
        """Open an existing store (``fsync`` as in :meth:`create`).

        Before SQLite touches the index, its write-ahead log is validated
        (:func:`fedforget.history.wal.analyse_wal`): SQLite would read a log with a damaged
        frame as a shorter history, silently, and its next write or checkpoint would make
        the loss permanent. A damaged log is refused; so is a log whose last commit frame
        is torn while a signed tree head in ``tree_heads.jsonl`` covers more rounds or
        withdrawal events than the readable store holds.

        Parameters
        ----------
        read_only
            Open an in-memory image of the index and its log
            (:func:`fedforget.history.wal.database_image`): nothing on disk is written, not
            even ``-shm``, so this works on a read-only or full disk; writes raise
            :class:`HistoryError`.

        Raises
        ------
        HistoryError
            If the directory or its index is missing, the index is not a history index, or
            its format version is not :data:`FORMAT_VERSION`.
        IntegrityError
            If the write-ahead log is damaged (the message names the frame and what would be
            lost).
        StorageError
            If the files cannot be read (or, read-write, the index cannot be opened).
        """
        path = Path(directory)
        if not path.is_dir():
            raise HistoryError(f"no history store at {path}: directory does not exist")
        index = path / INDEX_FILENAME
        if not index.is_file():
            raise HistoryError(f"{path} is not a history store: {index} is missing")
        wal = analyse_wal(index.with_name(index.name + WAL_SUFFIX))
        if read_only or wal.damage is not None or wal.torn_commit is not None:
            image, wal = database_image(index, wal)
            try:
                snapshot = open_image(image)
            except sqlite3.Error as exc:
                raise HistoryError(f"{index} is not a history index: {exc}") from exc
            owned = False
            try:
                _refuse_lost_commits(path, snapshot, wal)
                if read_only:
                    meta = _read_meta(snapshot, path)
                    store = cls(path, snapshot, meta, fsync=fsync, read_only=True)
                    owned = True  # the store closes it
                    return store
            finally:
                if not owned:
                    snapshot.close()
        try:
            conn = _connect(index, create=False, fsync=fsync)
        except sqlite3.Error as exc:
            text = str(exc).lower()
            if "unable to open" in text or "readonly" in text:
                raise StorageError(
                    f"cannot open {index} for writing: {exc} (on a read-only file system "
                    "use HistoryStore.open(..., read_only=True) or `fedforget history "
                    "verify`)", filename=str(index)
                ) from exc
            raise HistoryError(f"{index} is not a history index: {exc}") from exc
        try:
            meta = _read_meta(conn, path)
            return cls(path, conn, meta, fsync=fsync)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the index and unmap the store's blobs kept mapped by
        :class:`~fedforget.history.views.BlobViews`. Further use of the store raises
        :class:`HistoryError`."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        release_mappings(self._blob_root)

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HistoryStore({str(self._directory)!r}, codec={self._codec!r}, "
            f"retain_interval={self._retain_interval})"
        )

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError(f"history store {self._directory} is closed")
        return self._conn

    # ------------------------------------------------------------------ properties

    @property
    def directory(self) -> Path:
        """The run directory."""
        return self._directory

    @property
    def codec(self) -> str:
        """Codec of stored client updates."""
        return self._codec

    @property
    def retain_interval(self) -> int:
        """Δt, the retention interval of client updates."""
        return self._retain_interval

    @property
    def created_at(self) -> str:
        """RFC 3339 UTC creation time of the store."""
        return self._created_at

    @property
    def run_config(self) -> dict[str, Any]:
        """A fresh copy of the run configuration recorded at creation."""
        config: dict[str, Any] = json.loads(self._run_config_json)
        return config

    @property
    def read_only(self) -> bool:
        """Whether the store was opened read-only (an in-memory image; writes refused)."""
        return self._read_only

    def _current_context(self) -> bytes:
        if self._initial_digest is None:
            raise HistoryError(
                f"{self._directory} has no initial model yet: the run context (and so the "
                "record of round 1) needs it; call put_initial_model first"
            )
        row = self._db.execute("SELECT value FROM meta WHERE key = 'recording'").fetchone()
        return run_context_bytes(
            run_config=self.run_config,
            codec=self._codec,
            retain_interval=self._retain_interval,
            roster=self._roster_meta,
            initial_model=self._initial_digest,
            created_at=self._created_at,
            recording=None if row is None else json.loads(row[0]),
        )

    @property
    def run_context(self) -> bytes:
        """The canonical bytes of the run context (:func:`~fedforget.history.records.
        run_context_bytes`): frozen when round 1 commits, the current one before."""
        return self._run_context if self._run_context is not None else self._current_context()

    @property
    def run_digest(self) -> str:
        """SHA-256 of :attr:`run_context`: what every round record's ``run`` holds."""
        return sha256_digest(self.run_context)

    @property
    def last_round(self) -> int:
        """Number of the last committed round; 0 when none is."""
        (last,) = self._db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()
        return int(last)

    @property
    def initial_model_digest(self) -> str | None:
        """fp32 digest of θ_0, or None before :meth:`put_initial_model`."""
        row = self._db.execute("SELECT digest FROM models WHERE round = 0").fetchone()
        return None if row is None else str(row[0])

    def commitment(self) -> Commitment:
        """Sizes and Merkle roots of the store's round tree and withdrawal ledger, as a
        signed tree head commits to them (:mod:`fedforget.history.commitment`)."""
        return commitment_of(self._db)

    def head_problems(self, heads: Sequence[LoggedHead]) -> list[str]:
        """What the store fails to reproduce of ``heads`` (signatures not checked): see
        :func:`fedforget.history.commitment.compare_heads`."""
        return compare_heads(self._db, heads)

    def model_digest(self, t: int) -> str:
        """fp32 digest of θ after round ``t`` (``t = 0``: the initial model), from the index."""
        row = self._db.execute("SELECT digest FROM models WHERE round = ?", (t,)).fetchone()
        if row is None:
            raise HistoryError(
                f"{self._directory} holds no global model after round {t!r}: committed "
                f"rounds are 1..{self.last_round}"
            )
        return str(row[0])

    def is_retained(self, round: int) -> bool:
        """Whether client updates of ``round`` are stored (rounds 1, 1 + Δt, 1 + 2Δt, ...)."""
        return _retained(round, self._retain_interval)

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def _transaction(self, action: str = "write to") -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception (a full
        or read-only disk becomes a StorageError naming the index; the store is then
        unchanged)."""
        if self._read_only:
            raise HistoryError(
                f"cannot {action} {self._directory}: the store was opened read-only"
            )
        db = self._db
        index = self._directory / INDEX_FILENAME
        with _guard_sqlite(index, action, "the store is unchanged"):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def _stored_digests(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` that the index already lists."""
        found: set[str] = set()
        unique = list(dict.fromkeys(digests))
        for i in range(0, len(unique), _SQL_VARIABLES):
            chunk = unique[i : i + _SQL_VARIABLES]
            marks = ",".join("?" * len(chunk))
            found.update(
                d for (d,) in self._db.execute(
                    f"SELECT digest FROM blobs WHERE digest IN ({marks})", chunk
                )
            )
        return found

    def _write_pack(
        self, round: int, blobs: Iterator[tuple[str, bytes]]
    ) -> list[tuple[str, str, int, int]]:
        """Append the blobs not stored yet to a new pack file, durable on return.

        ``blobs`` yields ``(digest, data)``; digests the index lists, and repeats, are
        skipped. Returns the index rows ``(digest, pack, offset, nbytes)`` of the blobs
        written (none, and no file, when every blob is already stored).
        """
        rows: list[tuple[str, str, int, int]] = []
        name = _pack_name(round)
        path = os.path.join(self._blob_root, name)
        f = None
        try:
            for digest, data in blobs:
                if f is None:
                    f = open(path, "xb", buffering=_WRITE_BUFFER)  # noqa: SIM115
                offset = f.tell()
                f.write(data)
                rows.append((digest, name, offset, len(data)))
            if f is not None:
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
                f.close()
        except BaseException as exc:
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if isinstance(exc, OSError):
                what = "the initial model" if round == 0 else f"round {round}"
                raise storage_error(
                    exc, path, f"write the blobs of {what} to",
                    f"the store is unchanged at round {self.last_round}",
                ) from exc
            raise
        if rows and self._fsync:
            with _guard_sqlite(Path(self._blob_root), "fsync"):
                _fsync_directory(self._blob_root)
        return rows

    def _check_next_round(self, round: int, global_before: str) -> None:
        row = self._db.execute(
            "SELECT round, global_after FROM rounds ORDER BY round DESC LIMIT 1"
        ).fetchone()
        last = 0 if row is None else int(row[0])
        if round != last + 1:
            raise HistoryError(
                f"cannot commit round {round!r} to {self._directory}: the last committed "
                f"round is {last}, expected round {last + 1}"
            )
        if last == 0:
            expected = self.initial_model_digest
            if expected is None:
                raise HistoryError(
                    f"cannot commit round 1 to {self._directory}: no initial model; "
                    "call put_initial_model first"
                )
            source = "the initial model"
        else:
            expected = row[1]
            source = f"global_after of round {last}"
        if global_before != expected:
            raise HistoryError(
                f"cannot commit round {round}: global_before is {global_before!r}, expected "
                f"{expected!r} ({source})"
            )

    def set_roster(self, client_ids: Sequence[str]) -> None:
        """Record the federation's client ids (every client that could take part).

        The roster is part of the run context, which round 1 freezes (the sampler draws
        from it: another roster is another schedule). Setting the same roster again writes
        nothing.

        Raises
        ------
        HistoryError
            If rounds are committed and ``client_ids`` is not the roster they were trained
            with.
        """
        roster = tuple(sorted(set(client_ids)))
        if self._read_only:
            raise HistoryError(
                f"cannot record the roster in {self._directory}: the store was opened read-only"
            )
        if roster == self._roster_meta:
            return
        if self._run_context is not None:
            frozen = tuple(json.loads(self._run_context)["roster"])
            added = sorted(set(roster) - set(frozen))
            removed = sorted(set(frozen) - set(roster))
            raise HistoryError(
                f"cannot change the roster of {self._directory}: rounds are committed under "
                f"the roster of {len(frozen)} clients they record (the run context); the new "
                f"one adds {added or 'none'} and drops {removed or 'none'}. A federation with "
                "other clients is another run: use a new run directory"
            )
        value = json.dumps(list(roster))
        with self._transaction("record the roster in") as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('roster', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (value,),
            )
        self._roster_meta = roster

    def set_recording(self, settings: Mapping[str, Any]) -> None:
        """Record how the run is sampled, seeded and stored
        (:meth:`fedforget.settings.RecordingSettings.to_dict`).

        Part of the run context, which round 1 freezes: other settings afterwards are
        refused (they would sample, seed or store the run differently).
        """
        value = canonical_json(dict(settings)).decode("utf-8")
        if self._run_context is not None:
            frozen = json.loads(self._run_context).get("recording")
            if frozen != json.loads(value):
                raise HistoryError(
                    f"cannot record the settings {value} in {self._directory}: its rounds were "
                    f"committed with {json.dumps(frozen, sort_keys=True)}"
                )
            return
        with self._transaction("record the recording settings of") as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('recording', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (value,),
            )

    @property
    def recording(self) -> dict[str, Any]:
        """The recording settings of the run (empty if none were recorded)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'recording'").fetchone()
        return dict(json.loads(row[0])) if row is not None else {}

    def roster(self) -> tuple[str, ...]:
        """The federation's client ids (those that ever took part, if none was recorded)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'roster'").fetchone()
        ids = set(json.loads(row[0])) if row is not None else set()
        # The distinct ids come from the participants_by_client index, not a list per client.
        ids.update(c for (c,) in self._db.execute("SELECT DISTINCT client_id FROM participants"))
        return tuple(sorted(ids))

    def fork(self, directory: str | os.PathLike[str], *, upto_round: int) -> HistoryStore:
        """A new store in ``directory`` holding this store's rounds ``1..upto_round``.

        The fork has the same run config, codec, retention, roster and creation time (the
        run context its copied records commit to); its index rows are copied
        and the packs holding its blobs hard-linked (copied across file systems; packs are
        never modified), so it costs little. Exact unlearning replays later rounds into a
        fork: the original history stays as it was.
        """
        if not 0 <= upto_round <= self.last_round:
            raise HistoryError(
                f"cannot fork {self._directory} at round {upto_round}: committed rounds are "
                f"0..{self.last_round}"
            )
        if self.initial_model_digest is None:
            raise HistoryError(f"cannot fork {self._directory}: it has no initial model")
        fork = HistoryStore.create(
            directory,
            run_config=self.run_config,
            codec=self._codec,
            retain_interval=self._retain_interval,
            fsync=self._fsync,
        )
        try:
            src = self._db
            models = src.execute(
                "SELECT round, digest FROM models WHERE round <= ?", (upto_round,)
            ).fetchall()
            rounds = src.execute(
                "SELECT round, global_before, global_after, record, record_digest, committed_at "
                "FROM rounds WHERE round <= ?",
                (upto_round,),
            ).fetchall()
            participants = src.execute(
                "SELECT round, client_id, num_examples, weight, update_digest, retained "
                "FROM participants WHERE round <= ?",
                (upto_round,),
            ).fetchall()
            wanted = {d for _, d in models} | {p[4] for p in participants if p[5]}
            all_blobs = src.execute("SELECT digest, pack, offset, nbytes FROM blobs").fetchall()
            packs = sorted({pack for digest, pack, _, _ in all_blobs if digest in wanted})
            # Every blob of a linked pack is listed, so that each pack of the fork is covered
            # by its index from end to end, as in any store.
            linked = set(packs)
            blobs = [row for row in all_blobs if row[1] in linked]
            for pack in packs:
                source = os.path.join(self._blob_root, pack)
                target = os.path.join(fork._blob_root, pack)
                try:
                    os.link(source, target)
                except FileExistsError:
                    pass
                except OSError:
                    shutil.copyfile(source, target)
            if packs and self._fsync:
                _fsync_directory(fork._blob_root)
            roster = src.execute("SELECT value FROM meta WHERE key = 'roster'").fetchone()
            recording = src.execute(
                "SELECT value FROM meta WHERE key = 'recording'").fetchone()
            context = self._run_context if upto_round >= 1 else None
            with fork._transaction("fork into") as db:
                # The fork is this history's first rounds: it keeps its creation time (part of
                # the run context its copied records commit to).
                db.execute("UPDATE meta SET value = ? WHERE key = 'created_at'",
                           (self._created_at,))
                if roster is not None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('roster', ?)", roster)
                if recording is not None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('recording', ?)",
                               recording)
                if context is not None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('run_context', ?)",
                               (context.decode("utf-8"),))
                db.executemany(
                    "INSERT INTO blobs (digest, pack, offset, nbytes) VALUES (?, ?, ?, ?)", blobs
                )
                db.executemany("INSERT INTO models (round, digest) VALUES (?, ?)", models)
                db.executemany(
                    "INSERT INTO rounds (round, global_before, global_after, record, "
                    "record_digest, committed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    rounds,
                )
                db.executemany(
                    "INSERT INTO participants (round, client_id, num_examples, weight, "
                    "update_digest, retained) VALUES (?, ?, ?, ?, ?, ?)",
                    participants,
                )
        except BaseException:
            fork.close()
            raise
        fork._created_at = self._created_at
        fork._roster_meta = self._roster_meta if roster is not None else ()
        fork._run_context = context
        fork._initial_digest = self._initial_digest
        return fork

    def put_initial_model(self, tensors: Mapping[str, np.ndarray]) -> str:
        """Store θ_0 in fp32 (losslessly) and return its digest. Allowed once.

        Raises
        ------
        HistoryError
            If an initial model is already stored.
        """
        if self._read_only:
            raise HistoryError(f"cannot store an initial model in {self._directory}: the "
                               "store was opened read-only")
        existing = self.initial_model_digest
        if existing is not None:
            raise HistoryError(
                f"{self._directory} already holds an initial model ({existing}); "
                "it can be stored only once"
            )
        data = encode(tensors, "fp32")
        digest = sha256_digest(data)
        rows = [] if self._stored_digests([digest]) else self._write_pack(0, iter([(digest, data)]))
        with self._transaction("store the initial model in") as db:
            if db.execute("SELECT 1 FROM models WHERE round = 0").fetchone() is not None:
                raise HistoryError(f"{self._directory} already holds an initial model")
            db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, pack, offset, nbytes) VALUES (?, ?, ?, ?)",
                rows,
            )
            db.execute("INSERT INTO models (round, digest) VALUES (0, ?)", (digest,))
        self._initial_digest = digest
        return digest

    def _check_participants(
        self,
        round: int,
        global_after: Mapping[str, np.ndarray],
        participants: Sequence[ParticipantUpdate],
    ) -> None:
        shapes = {name: np.shape(value) for name, value in global_after.items()}
        for p in participants:
            if not isinstance(p, ParticipantUpdate):
                raise HistoryError(f"round {round}: participant {p!r} is not a ParticipantUpdate")
            if not isinstance(p.update, Mapping) or set(p.update) != set(shapes):
                keys = sorted(p.update) if isinstance(p.update, Mapping) else p.update
                raise HistoryError(
                    f"round {round}, client {p.client_id!r}: update has keys {keys}; "
                    f"expected the model's keys {sorted(shapes)}"
                )
            for name, value in p.update.items():
                array = np.asarray(value)
                if array.shape != shapes[name]:
                    raise HistoryError(
                        f"round {round}, client {p.client_id!r}: update tensor {name!r} has "
                        f"shape {array.shape}; expected {shapes[name]} as in the model"
                    )
                if array.dtype.kind not in "fiub":
                    raise HistoryError(
                        f"round {round}, client {p.client_id!r}: update tensor {name!r} has "
                        f"dtype {array.dtype}; expected a numeric dtype"
                    )

    def commit_round(
        self,
        *,
        round: int,
        global_before: str,
        global_after: Mapping[str, np.ndarray],
        participants: Sequence[ParticipantUpdate],
        config: Mapping[str, Any],
        refused: Sequence[RefusedReply] = (),
        committed_at: str | None = None,
    ) -> RoundRecord:
        """Record round ``round`` atomically and return its record.

        The same as :meth:`write_round` of :meth:`prepare_round`.

        Parameters
        ----------
        round
            Must be ``last_round + 1``.
        global_before
            fp32 digest of θ_t, the model sent out; must equal the previous round's
            ``global_after`` (for round 1, the initial model's digest).
        global_after
            The aggregated θ_{t+1}; stored in fp32.
        participants
            Accepted replies with their updates Δ_{t,k} (same keys and shapes as the model).
            Every update's digest is recorded; the update itself only in retained rounds.
        config
            Train config sent to clients this round (JSON-serialisable).
        refused
            Replies the server refused this round.
        committed_at
            RFC 3339 UTC timestamp; defaults to now.

        Returns
        -------
        RoundRecord
            The committed record.

        Raises
        ------
        HistoryError
            On a round out of sequence, a global_before that does not chain, or participants
            that cannot be recorded (duplicate ids, keys or shapes unlike the model's). The
            index is then unchanged.
        """
        self._check_next_round(round, global_before)
        return self.write_round(
            self.prepare_round(
                round=round, global_before=global_before, global_after=global_after,
                participants=participants, config=config, refused=refused,
                committed_at=committed_at,
            )
        )

    def prepare_round(
        self,
        *,
        round: int,
        global_before: str,
        global_after: Mapping[str, np.ndarray],
        participants: Sequence[ParticipantUpdate],
        config: Mapping[str, Any],
        refused: Sequence[RefusedReply] = (),
        committed_at: str | None = None,
    ) -> PreparedRound:
        """The first half of :meth:`commit_round`: validate, encode and hash the round and
        build its record, without touching the store (arguments as there).

        Pure computation, so that a caller with a writer thread can do it on its own thread
        and leave only the I/O of :meth:`write_round` to the writer. The round's place in
        the sequence is checked by :meth:`write_round`.

        Raises
        ------
        HistoryError
            On participants that cannot be recorded (duplicate ids, keys or shapes unlike
            the model's) or a record field that is not valid.
        """
        if not isinstance(global_after, Mapping) or not global_after:
            raise HistoryError(f"round {round}: global_after must be a non-empty tensor dict")
        participants = list(participants)
        self._check_participants(round, global_after, participants)
        retained = self.is_retained(round)
        when = utc_now() if committed_at is None else committed_at

        # Digests and the full record, so every field is validated before any blob is
        # written. Encoded updates of a retained round are kept for write_round while they
        # fit in _KEEP_ENCODED_BYTES; beyond that they are encoded again (cheap next to I/O).
        model_data = encode(global_after, "fp32")
        model_digest = sha256_digest(model_data)
        encoded: dict[str, bytes] = {}
        kept = 0
        records: list[ParticipantRecord] = []
        for p in participants:
            data = encode(p.update, self._codec)
            digest = sha256_digest(data)
            if retained and kept + len(data) <= _KEEP_ENCODED_BYTES:
                encoded[p.client_id] = data
                kept += len(data)
            records.append(
                ParticipantRecord(
                    client_id=p.client_id,
                    num_examples=p.num_examples,
                    weight=p.weight,
                    update_digest=digest,
                    retained=retained,
                    metrics=p.metrics,
                    seed=p.seed,
                )
            )
        record = RoundRecord(
            round=round,
            global_before=global_before,
            global_after=model_digest,
            participants=tuple(records),
            refused=tuple(refused),
            config=config,
            committed_at=when,
            run_digest=self.run_digest,
        )
        record.canonical_bytes()  # computed (and kept) here, not on the writer
        return PreparedRound(
            record=record,
            model_data=model_data,
            updates=tuple(participants) if retained else (),
            encoded=encoded,
            codec=self._codec,
        )

    def write_round(self, prepared: PreparedRound) -> RoundRecord:
        """The second half of :meth:`commit_round`: write a prepared round atomically.

        Raises
        ------
        HistoryError
            On a round out of sequence or a global_before that does not chain (the store is
            then unchanged), or a prepared round of another codec.
        """
        record = prepared.record
        round, global_before = record.round, record.global_before
        if prepared.codec != self._codec:
            raise HistoryError(
                f"round {round} was prepared for codec {prepared.codec!r}; this store "
                f"records {self._codec!r}"
            )
        if self._read_only:
            raise HistoryError(f"cannot commit round {round} to {self._directory}: the store "
                               "was opened read-only")
        self._check_next_round(round, global_before)
        context = self.run_context
        if record.run_digest != sha256_digest(context):
            raise HistoryError(
                f"round {round} was prepared under run context {record.run_digest}; the "
                f"store's run context is {sha256_digest(context)} (its roster or initial "
                "model changed in between)"
            )
        model_digest = record.global_after
        record_bytes = record.canonical_bytes()

        # The blobs not stored yet, in one pack, durable before the index rows that
        # reference them.
        expected = {r.client_id: r.update_digest for r in record.participants}
        candidates = [model_digest, *expected.values()] if prepared.updates else [model_digest]
        stored = self._stored_digests(candidates)
        encoded = dict(prepared.encoded)

        def new_blobs() -> Iterator[tuple[str, bytes]]:
            # The retained updates in the order given, then the global model.
            for p in prepared.updates:
                digest = expected[p.client_id]
                if digest in stored:
                    continue
                data = encoded.pop(p.client_id, None)
                if data is None:
                    data = encode(p.update, self._codec)
                    if sha256_digest(data) != digest:
                        raise HistoryError(
                            f"round {round}, client {p.client_id!r}: the update changed "
                            f"while being committed ({digest} then {sha256_digest(data)})"
                        )
                stored.add(digest)
                yield digest, data
            if model_digest not in stored:
                yield model_digest, prepared.model_data

        blob_rows = self._write_pack(round, new_blobs())

        with self._transaction(f"commit round {round} to") as db:
            self._check_next_round(round, global_before)  # against a concurrent writer
            if self._run_context is None:  # round 1 freezes the run context
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('run_context', ?)",
                    (context.decode("utf-8"),),
                )
            db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, pack, offset, nbytes) VALUES (?, ?, ?, ?)",
                blob_rows,
            )
            db.execute("INSERT INTO models (round, digest) VALUES (?, ?)", (round, model_digest))
            db.execute(
                "INSERT INTO rounds (round, global_before, global_after, record, record_digest, "
                "committed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    round,
                    global_before,
                    model_digest,
                    record_bytes,
                    sha256_digest(record_bytes),
                    record.committed_at,
                ),
            )
            db.executemany(
                "INSERT INTO participants (round, client_id, num_examples, weight, "
                "update_digest, retained) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (round, r.client_id, r.num_examples, r.weight, r.update_digest, r.retained)
                    for r in record.participants
                ],
            )
        self._run_context = context
        return record

    # ------------------------------------------------------------------ reads

    def _location(self, digest: str, pack: str, offset: int, nbytes: int) -> BlobLocation:
        return BlobLocation(digest, Path(self._blob_root) / pack, int(offset), int(nbytes))

    def blob_location(self, digest: str) -> BlobLocation:
        """Where the blob ``digest`` is stored (its pack file, offset and length).

        Raises
        ------
        HistoryError
            If the index lists no such blob.
        """
        row = self._db.execute(
            "SELECT pack, offset, nbytes FROM blobs WHERE digest = ?", (digest,)
        ).fetchone()
        if row is None:
            raise HistoryError(f"{self._directory} stores no blob {digest}")
        return self._location(digest, *row)

    def _record_from_row(self, t: int, record: object, record_digest: str) -> RoundRecord:
        if not isinstance(record, bytes):
            raise IntegrityError(
                f"round {t}: record in {self._directory / INDEX_FILENAME} is a "
                f"{type(record).__name__}; expected canonical JSON bytes"
            )
        found = sha256_digest(record)
        if found != record_digest:
            raise IntegrityError(
                f"round {t}: record in {self._directory / INDEX_FILENAME} is altered: its "
                f"SHA-256 is {found}, expected {record_digest}"
            )
        parsed = RoundRecord.from_bytes(record)
        if parsed.round != t:
            raise IntegrityError(f"round {t}: index row holds the record of round {parsed.round}")
        return parsed

    def rounds(self) -> Iterator[RoundRecord]:
        """Stream the round records in order, checking each against its recorded SHA-256."""
        cursor = self._db.execute("SELECT round, record, record_digest FROM rounds ORDER BY round")
        try:
            for t, record, record_digest in cursor:
                yield self._record_from_row(t, record, record_digest)
        finally:
            cursor.close()

    def record_bytes(self) -> Iterator[bytes]:
        """Stream the canonical bytes of the round records in order (the Merkle leaves),
        each checked against its recorded SHA-256, without parsing them."""
        cursor = self._db.execute("SELECT round, record, record_digest FROM rounds ORDER BY round")
        try:
            for t, record, record_digest in cursor:
                if not isinstance(record, bytes) or sha256_digest(record) != record_digest:
                    self._record_from_row(t, record, record_digest)  # raises, naming it
                yield record
        finally:
            cursor.close()

    def round(self, t: int) -> RoundRecord:
        """The record of round ``t``.

        Raises
        ------
        HistoryError
            If round ``t`` is not in the store.
        IntegrityError
            If the stored record does not match its recorded SHA-256.
        """
        row = self._db.execute(
            "SELECT record, record_digest FROM rounds WHERE round = ?", (t,)
        ).fetchone()
        if row is None:
            raise HistoryError(
                f"round {t!r} is not in {self._directory}: committed rounds are "
                f"1..{self.last_round}"
            )
        return self._record_from_row(t, row[0], row[1])

    def global_model(self, t: int) -> dict[str, np.ndarray]:
        """θ after round ``t`` (``t = 0``: the initial model), read and digest-checked.

        Raises
        ------
        HistoryError
            If no such model is stored.
        IntegrityError
            If its blob is missing, truncated or altered (the message names the file).
        """
        row = self._db.execute(
            "SELECT m.digest, b.pack, b.offset, b.nbytes FROM models m "
            "JOIN blobs b ON b.digest = m.digest WHERE m.round = ?",
            (t,),
        ).fetchone()
        if row is None:
            what = "no initial model" if t == 0 else f"no global model after round {t!r}"
            raise HistoryError(
                f"{self._directory} holds {what}: committed rounds are 1..{self.last_round}"
            )
        where = "initial model (round 0)" if t == 0 else f"round {t}, global model"
        return decode(_read_range(self._location(*row), where))

    def client_update(self, t: int, client_id: str) -> dict[str, np.ndarray]:
        """The stored update Δ_{t,k} of ``client_id`` in round ``t``, digest-checked.

        Floating tensors come back as float32 (decoded from the run's codec).

        Raises
        ------
        HistoryError
            If the round is absent, the client did not participate, or the round was not
            retained.
        IntegrityError
            If the blob is missing, truncated or altered (the message names the file).
        """
        row = self._db.execute(
            "SELECT p.update_digest, p.retained, b.pack, b.offset, b.nbytes FROM participants p "
            "LEFT JOIN blobs b ON b.digest = p.update_digest "
            "WHERE p.round = ? AND p.client_id = ?",
            (t, client_id),
        ).fetchone()
        if row is None:
            if self._db.execute("SELECT 1 FROM rounds WHERE round = ?", (t,)).fetchone() is None:
                raise HistoryError(
                    f"round {t!r} is not in {self._directory}: committed rounds are "
                    f"1..{self.last_round}"
                )
            raise HistoryError(f"client {client_id!r} did not participate in round {t}")
        digest, retained, pack, offset, nbytes = row
        if not retained:
            raise HistoryError(
                f"the update of client {client_id!r} in round {t} was not retained: "
                f"retain_interval {self._retain_interval} keeps rounds 1, "
                f"{1 + self._retain_interval}, {1 + 2 * self._retain_interval}, ..."
            )
        if pack is None:
            raise IntegrityError(
                f"round {t}, client {client_id!r}: the index lists no blob for {digest}"
            )
        where = f"round {t}, client {client_id!r}"
        return decode(_read_range(self._location(digest, pack, offset, nbytes), where))

    def client_rounds(self, client_id: str) -> list[int]:
        """The rounds ``client_id`` participated in (ascending), from the per-client index
        (no scan of the other clients' rows)."""
        return [t for (t,) in self._db.execute(
            "SELECT round FROM participants WHERE client_id = ? ORDER BY round", (client_id,)
        )]

    def clients(self) -> dict[str, list[int]]:
        """Client id -> the rounds it participated in (ascending), ids sorted."""
        out: dict[str, list[int]] = {}
        for client_id, t in self._db.execute(
            "SELECT client_id, round FROM participants ORDER BY client_id, round"
        ):
            out.setdefault(client_id, []).append(t)
        return out

    def bytes_stored(self) -> int:
        """Bytes of every blob the store holds (``summary()["bytes_stored"]``, alone)."""
        (total,) = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blobs").fetchone()
        return int(total)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready overview of the store.

        Keys: ``directory``, ``format_version``, ``created_at``, ``codec``,
        ``retain_interval``, ``rounds`` (last round), ``retained_rounds``, ``clients``
        (id -> rounds), ``num_blobs``, ``bytes_stored`` (all blobs), ``model_bytes``,
        ``update_bytes``, ``initial_model_digest``, ``final_model_digest`` (global_after of
        the last round, or the initial model's digest) and ``run_config``.
        """
        db = self._db
        last = self.last_round
        num_blobs, total = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM blobs"
        ).fetchone()
        (model_bytes,) = db.execute(
            "SELECT COALESCE(SUM(nbytes), 0) FROM blobs WHERE digest IN (SELECT digest FROM models)"
        ).fetchone()
        (update_bytes,) = db.execute(
            "SELECT COALESCE(SUM(nbytes), 0) FROM blobs WHERE digest IN "
            "(SELECT update_digest FROM participants WHERE retained)"
        ).fetchone()
        initial = self.initial_model_digest
        if last:
            (final,) = db.execute(
                "SELECT global_after FROM rounds WHERE round = ?", (last,)
            ).fetchone()
        else:
            final = initial
        return {
            "directory": str(self._directory),
            "format_version": FORMAT_VERSION,
            "created_at": self._created_at,
            "codec": self._codec,
            "retain_interval": self._retain_interval,
            "rounds": last,
            "retained_rounds": [t for t in range(1, last + 1) if self.is_retained(t)],
            "clients": self.clients(),
            "num_blobs": int(num_blobs),
            "bytes_stored": int(total),
            "model_bytes": int(model_bytes),
            "update_bytes": int(update_bytes),
            "initial_model_digest": initial,
            "final_model_digest": final,
            "run_config": self.run_config,
        }

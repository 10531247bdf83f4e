"""Offline verification of a history store and of the run directory around it.

:func:`verify_store` reads a run directory without the help of :class:`HistoryStore` and
reports every problem it finds: a damaged store gives a report, never an exception. Callers
that must fail closed use :meth:`VerifyReport.raise_for_problems`.

It never writes a byte: the index and its write-ahead log are read as files and opened as an
in-memory image (:func:`fedforget.history.wal.database_image`), so no ``-shm`` is created,
no log is checkpointed, and a read-only copy of a run directory, or one on a full disk,
verifies like the original. (Opening the index with ``mode=ro`` would still create ``-shm``;
``immutable=1`` would ignore the log.)

Checks of the store
-------------------
1. The write-ahead log: every frame's salts and checksum; a damaged frame that SQLite
   would pass over in silence, dropping the committed transactions after it, is reported
   with what the signed heads say was lost.
2. ``PRAGMA integrity_check`` on the image.
3. The index records format :data:`~fedforget.history.store.FORMAT_NAME`, version
   :data:`~fedforget.history.store.FORMAT_VERSION`, a known codec and a retain interval >= 1.
4. Rounds are contiguous, 1..N.
5. Each round's record bytes match their recorded SHA-256, are the canonical form of the
   record they hold, and agree with the index columns (global models, commit time, and each
   participant's example count, weight, update digest and retention); ``global_before`` of
   round t equals ``global_after`` of round t - 1 (round 1: the initial model's digest).
6. Every record's ``run`` is the digest of the frozen run context, and the run context
   agrees with the meta table (run config, roster, codec, retention) and the initial model.
7. The withdrawal ledger: events numbered 1..L, each request's identity fields never
   change, and the ``withdrawals`` table is exactly the last event of every request.
8. Every referenced blob (initial model, each round's global model, each retained update)
   is listed in the index, its pack file exists and holds the blob's whole byte range, and
   the SHA-256 of those bytes, computed in chunks, matches its name.
9. Every pack file the index lists ends where its last listed blob ends (nothing appended).

Checks of the run directory
---------------------------
See :mod:`fedforget.history.audit`: the signed tree heads (``tree_heads.jsonl``, a head given
with ``head``, the heads clients saved) against the store, receipts, results, cached
references, the model in service, salts and keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedforget.errors import FedForgetError, HistoryError, IntegrityError
from fedforget.history.audit import audit_run_directory
from fedforget.history.commitment import ledger_rows, spans
from fedforget.history.records import RoundRecord, run_context_bytes
from fedforget.history.report import VerifyReport
from fedforget.history.store import (
    _SCHEMA,
    BLOB_DIRNAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILENAME,
    BlobLocation,
    _statements,
)
from fedforget.history.wal import WalReport, database_image, open_image
from fedforget.lock import LOCK_FILENAME
from fedforget.tensors import CODECS, sha256_digest

__all__ = ["VerifyReport", "verify_store"]

_CHUNK = 1 << 20


def _hash_range(location: BlobLocation) -> tuple[int, str]:
    """(bytes present, ``"sha256:<hex>"`` of them) of a blob's range, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with location.path.open("rb") as f:
        f.seek(location.offset)
        while size < location.nbytes and (chunk := f.read(min(_CHUNK, location.nbytes - size))):
            digest.update(chunk)
            size += len(chunk)
    return size, "sha256:" + digest.hexdigest()


class _BlobChecker:
    """Hashes each distinct blob once and reports it for every reference."""

    def __init__(self, directory: Path, report: VerifyReport) -> None:
        self._blob_root = directory / BLOB_DIRNAME
        self._report = report
        self._results: dict[str, str | None] = {}

    def check(
        self, digest: str, row: tuple[Any, Any, Any] | None, where: str, what: str
    ) -> None:
        """Check blob ``digest`` whose index row is ``(pack, offset, nbytes)`` (None or
        NULLs when the index lists none), and report a problem under ``where``."""
        if digest not in self._results:
            self._results[digest] = self._check_blob(digest, row)
        problem = self._results[digest]
        if problem is not None:
            self._report.problems.append(f"{where}: {what} {problem}")

    def _check_blob(self, digest: str, row: tuple[Any, Any, Any] | None) -> str | None:
        if row is None or row[0] is None:
            return f"{digest} is not listed in the blob table of the index"
        pack, offset, nbytes = row
        try:
            location = BlobLocation(digest, self._blob_root / str(pack), int(offset),
                                    int(nbytes))
        except (TypeError, ValueError):
            return f"{digest} has a malformed index row {row!r}"
        if location.offset < 0 or location.nbytes < 0 or "/" in str(pack):
            return f"{digest} has an impossible index row {row!r}"
        try:
            size, found = _hash_range(location)
        except FileNotFoundError:
            return f"{location} is missing: the file does not exist (expected {digest})"
        except (OSError, OverflowError, ValueError) as exc:
            return f"{location} cannot be read: {exc}"
        self._report.blobs_checked += 1
        if size != location.nbytes:
            return f"{location} is truncated: {size} of {location.nbytes} bytes present"
        if found != digest:
            return f"{location} is altered: its SHA-256 is {found}, expected {digest}"
        return None

    def check_pack_sizes(self, conn: sqlite3.Connection) -> None:
        """Report pack files longer than the blobs the index lists in them."""
        for pack, end in _rows(
            conn, "SELECT pack, MAX(offset + nbytes) FROM blobs GROUP BY pack ORDER BY pack"
        ):
            path = self._blob_root / str(pack)
            try:
                size = path.stat().st_size
            except (OSError, ValueError):
                continue  # reported with its blobs
            if isinstance(end, int) and size > end:
                self._report.problems.append(
                    f"pack {path}: {size - end} bytes after its last blob (the index lists "
                    f"{end} bytes of blobs in it)"
                )


def _check_meta(conn: sqlite3.Connection, index: Path, report: VerifyReport
                ) -> dict[str, str] | None:
    """Check the meta table; return it, or None if the index is unusable."""
    meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta").fetchall()}
    if meta.get("format") != FORMAT_NAME:
        report.problems.append(
            f"index {index}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}"
        )
        return None
    if meta.get("format_version") != str(FORMAT_VERSION):
        report.problems.append(
            f"index {index}: format version is {meta.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
        return None
    if meta.get("codec") not in CODECS:
        report.problems.append(
            f"index {index}: codec is {meta.get('codec')!r}, expected one of {', '.join(CODECS)}"
        )
    try:
        retain_interval = int(meta.get("retain_interval", ""))
    except ValueError:
        retain_interval = 0
    if retain_interval < 1:
        report.problems.append(
            f"index {index}: retain_interval is {meta.get('retain_interval')!r}, "
            "expected an integer >= 1"
        )
        return None
    return meta


def _expected_schema() -> list[tuple[str, str, str, str | None]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as fresh:
        for statement in _statements(_SCHEMA):
            fresh.execute(statement)
        return fresh.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()


def _check_schema(conn: sqlite3.Connection, index: Path, report: VerifyReport) -> None:
    """The tables, indexes and triggers are exactly those of the format (a dropped or
    rewritten trigger would let the withdrawal log miss changes)."""
    found = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()
    expected = _expected_schema()
    if found == expected:
        return
    mine = {(t, n): sql for t, n, _, sql in found}
    theirs = {(t, n): sql for t, n, _, sql in expected}
    def state(key: tuple[str, str]) -> str:
        return "missing" if key not in mine else "unexpected" if key not in theirs else "altered"

    differ = sorted(
        f"{t} {n} ({state((t, n))})"
        for t, n in set(mine) | set(theirs) if mine.get((t, n)) != theirs.get((t, n))
    ) or ["the order or owner of its entries"]
    report.problems.append(
        f"index {index}: its schema differs from format {FORMAT_VERSION}'s: {'; '.join(differ)}"
    )


def _rows(conn: sqlite3.Connection, sql: str, args: Sequence[Any] = ()
          ) -> Iterator[tuple[Any, ...]]:
    cursor = conn.execute(sql, args)
    try:
        yield from cursor
    finally:
        cursor.close()


def _check_run_context(
    conn: sqlite3.Connection, index: Path, meta: dict[str, str], run_digests: set[str],
    report: VerifyReport,
) -> None:
    """Check 6: the records' run digest, the frozen context and the meta table agree."""
    context_text = meta.get("run_context")
    initial = conn.execute("SELECT digest FROM models WHERE round = 0").fetchone()
    if context_text is None:
        if run_digests:
            report.problems.append(
                f"index {index}: meta.run_context is missing, but rounds commit to run "
                f"context {', '.join(sorted(run_digests))}"
            )
        return
    frozen = context_text.encode("utf-8")
    digest = sha256_digest(frozen)
    others = sorted(run_digests - {digest})
    if others:
        report.problems.append(
            f"index {index}: meta.run_context hashes to {digest}, but the round records "
            f"commit to {', '.join(others)}: the run context was changed after round 1"
        )
    try:
        context = json.loads(frozen)
        expected = run_context_bytes(
            run_config=json.loads(meta.get("run_config", "null")),
            codec=meta.get("codec", ""),
            retain_interval=int(meta.get("retain_interval", "0")),
            roster=json.loads(meta.get("roster", "[]")),
            initial_model="" if initial is None else str(initial[0]),
            created_at=meta.get("created_at", ""),
            recording=json.loads(meta["recording"]) if "recording" in meta else None,
        )
    except (ValueError, TypeError, FedForgetError) as exc:
        report.problems.append(f"index {index}: the meta table cannot be read: {exc}")
        return
    if expected == frozen:
        return
    mine = json.loads(expected)
    fields = {
        "run-config": "meta.run_config", "roster": "meta.roster", "codec": "meta.codec",
        "retain-interval": "meta.retain_interval", "initial-model": "the initial model "
        "(models, round 0)", "recording": "meta.recording", "created-at": "meta.created_at",
    }
    for key, name in fields.items():
        if mine.get(key) != context.get(key):
            detail = ""
            if key == "run-config" and isinstance(mine.get(key), dict) and isinstance(
                context.get(key), dict
            ):
                changed = sorted(
                    k for k in set(mine[key]) | set(context[key])
                    if mine[key].get(k) != context[key].get(k)
                )
                detail = ": " + ", ".join(
                    f"{k} is {mine[key].get(k)!r}, committed {context[key].get(k)!r}"
                    for k in changed
                )
            elif key == "roster":
                added = sorted(set(mine[key] or []) - set(context.get(key) or []))
                dropped = sorted(set(context.get(key) or []) - set(mine[key] or []))
                detail = f": adds {added or 'none'}, drops {dropped or 'none'}"
            else:
                detail = f": {mine.get(key)!r}, committed {context.get(key)!r}"
            report.problems.append(
                f"index {index}: {name} differs from the run context that the round "
                f"records commit to{detail}"
            )


def _check_rounds(
    conn: sqlite3.Connection,
    index: Path,
    meta: dict[str, str],
    blobs: _BlobChecker,
    report: VerifyReport,
) -> None:
    retain_interval = int(meta["retain_interval"])
    initial = conn.execute(
        "SELECT m.digest, b.pack, b.offset, b.nbytes FROM models m "
        "LEFT JOIN blobs b ON b.digest = m.digest WHERE m.round = 0"
    ).fetchone()
    if initial is not None:
        blobs.check(initial[0], initial[1:], "initial model (round 0)", "blob")
    previous_after: str | None = None if initial is None else str(initial[0])
    run_digests: set[str] = set()

    expected_round = 1
    for row in _rows(
        conn,
        "SELECT r.round, r.global_before, r.global_after, r.record, r.record_digest, "
        "r.committed_at, m.digest, b.pack, b.offset, b.nbytes FROM rounds r "
        "LEFT JOIN models m ON m.round = r.round LEFT JOIN blobs b ON b.digest = m.digest "
        "ORDER BY r.round",
    ):
        t, before, after, record_bytes, record_digest, committed_at, model_digest = row[:7]
        model_blob = row[7:]
        t = int(t)
        report.rounds_checked += 1
        if t != expected_round:
            report.problems.append(
                f"round {t}: rounds are not contiguous: expected round {expected_round} "
                f"in index {index}"
            )
        expected_round = t + 1
        where = f"round {t}"

        if previous_after is None and t == 1:
            report.problems.append(f"{where}: no initial model is recorded in index {index}")
        elif previous_after is not None and before != previous_after:
            source = "the initial model" if t == 1 else f"global_after of round {t - 1}"
            report.problems.append(
                f"{where}: global_before is {before}, expected {previous_after} ({source})"
            )
        previous_after = str(after)

        record: RoundRecord | None = None
        if not isinstance(record_bytes, bytes):
            record_bytes = str(record_bytes).encode("utf-8")
        found = sha256_digest(record_bytes)
        if found != record_digest:
            report.problems.append(
                f"{where}: record in index {index} is altered: its SHA-256 is {found}, "
                f"expected {record_digest}"
            )
        else:
            try:
                record = RoundRecord.from_bytes(record_bytes)
            except HistoryError as exc:
                report.problems.append(f"{where}: record in index {index} is invalid: {exc}")
            else:
                if record.canonical_bytes() != record_bytes:
                    report.problems.append(
                        f"{where}: record in index {index} is not the RFC 8785 canonical "
                        "form of the record it holds"
                    )
                run_digests.add(record.run_digest)
        if record is not None and (
            record.round != t or record.global_before != before or record.global_after != after
            or record.committed_at != committed_at
        ):
            report.problems.append(
                f"{where}: record in index {index} disagrees with its index columns "
                "(round, global_before, global_after or committed_at)"
            )

        if model_digest is None:
            report.problems.append(f"{where}: no global model is recorded in index {index}")
        else:
            if model_digest != after:
                report.problems.append(
                    f"{where}: global model {model_digest} differs from global_after {after}"
                )
            blobs.check(str(model_digest), model_blob, f"{where}, global model", "blob")

        _check_participants(conn, index, t, record, retain_interval, blobs, report)
    extra = conn.execute(
        "SELECT COUNT(*) FROM models WHERE round > ? OR round < 0", (expected_round - 1,)
    ).fetchone()[0]
    orphans = conn.execute(
        "SELECT DISTINCT round FROM participants WHERE round NOT IN (SELECT round FROM rounds)"
    ).fetchall()
    if extra or orphans:
        report.problems.append(
            f"index {index}: rows of rounds that have no record ({extra} global model(s); "
            f"participants of rounds {spans(int(r) for (r,) in orphans)})"
        )
    _check_run_context(conn, index, meta, run_digests, report)


def _check_participants(
    conn: sqlite3.Connection,
    index: Path,
    t: int,
    record: RoundRecord | None,
    retain_interval: int,
    blobs: _BlobChecker,
    report: VerifyReport,
) -> None:
    rows = conn.execute(
        "SELECT p.client_id, p.update_digest, p.retained, p.num_examples, p.weight, "
        "b.pack, b.offset, b.nbytes FROM participants p "
        "LEFT JOIN blobs b ON b.digest = p.update_digest WHERE p.round = ? "
        "ORDER BY p.client_id",
        (t,),
    ).fetchall()
    retained_round = (t - 1) % retain_interval == 0
    if record is not None:
        listed = [(p.client_id, p.update_digest, p.retained, p.num_examples, p.weight)
                  for p in record.participants]
        indexed = [(str(c), str(d), bool(r), n, w) for c, d, r, n, w, *_ in rows]
        if listed != indexed:
            differ = sorted(
                {c for c, *_ in listed} ^ {c for c, *_ in indexed}
                | {a[0] for a, b in zip(listed, indexed, strict=False) if a != b}
            )
            report.problems.append(
                f"round {t}: participants in index {index} disagree with the round record "
                f"(client id, example count, weight, update digest or retention of "
                f"{', '.join(differ) or 'the rows'})"
            )
    for client_id, digest, retained, _n, _w, *blob in rows:
        where = f"round {t}, client {client_id!r}"
        if bool(retained) != retained_round:
            report.problems.append(
                f"{where}: update marked retained={bool(retained)}, but retain_interval "
                f"{retain_interval} gives retained={retained_round}"
            )
        if retained:
            blobs.check(str(digest), tuple(blob), where, "update blob")


_IDENTITY = (1, 2, 3, 4)  # request_id, client_id, received_at, reason


def _check_ledger(conn: sqlite3.Connection, index: Path, report: VerifyReport) -> None:
    """Check 7: the withdrawal event log and the withdrawals table agree."""
    events = ledger_rows(conn)
    last: dict[str, tuple[Any, ...]] = {}
    for expected, row in enumerate(events, start=1):
        if row[0] != expected:
            report.problems.append(
                f"index {index}: withdrawal events are not numbered 1, 2, ...: event "
                f"{row[0]} is where event {expected} should be"
            )
            break
        before = last.get(row[1])
        if before is not None and tuple(before[i] for i in _IDENTITY) != tuple(
            row[i] for i in _IDENTITY
        ):
            report.problems.append(
                f"index {index}: withdrawal event {row[0]} changes the client, time or "
                f"reason of request {row[1]}"
            )
        last[row[1]] = row
    try:
        table = {
            r[0]: r for r in conn.execute(
                "SELECT request_id, client_id, received_at, reason, state, updated_at, method, "
                "detail, params, ordered_at, 'client', NULL FROM withdrawals"
            )
        }
        table.update({
            r[0]: r for r in conn.execute(
                "SELECT request_id, client_id, received_at, reason, state, updated_at, method, "
                "detail, params, ordered_at, kind, scope FROM erasures"
            )
        })
    except sqlite3.Error as exc:
        report.problems.append(f"index {index}: the withdrawals and erasures tables cannot "
                               f"be read: {exc}")
        return
    for request_id in sorted(set(table) | set(last)):
        entry: tuple[Any, ...] | None = table.get(request_id)
        event = last.get(request_id)
        if event is None and entry is not None:
            report.problems.append(
                f"index {index}: withdrawals entry {request_id} (client {entry[1]!r}, state "
                f"{entry[4]!r}) has no event in the withdrawal log"
            )
        elif event is None:
            continue
        elif entry is None:
            report.problems.append(
                f"index {index}: withdrawal request {request_id} of {event[2]!r} (event "
                f"{event[0]}) is missing from the withdrawals table"
            )
        elif tuple(entry) != tuple(event[1:]):
            columns = ("request_id", "client_id", "received_at", "reason", "state",
                       "updated_at", "method", "detail", "params", "ordered_at", "kind",
                       "scope")
            changed = [
                f"{c} is {a!r}, logged {b!r}" for c, a, b in zip(columns, entry, event[1:],
                                                                 strict=True) if a != b
            ]
            report.problems.append(
                f"index {index}: withdrawals entry {request_id} differs from its last logged "
                f"event {event[0]}: {'; '.join(changed)}"
            )


@contextlib.contextmanager
def _shared_lock(directory: Path) -> Iterator[None]:
    """Hold a shared lock on the run directory's lock file, if there is one (opened
    read-only: nothing is created), so that no writer changes files mid-check."""
    path = directory / LOCK_FILENAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = Path(path).read_text(encoding="utf-8", errors="replace").strip()
            raise HistoryError(
                f"{directory} is being written ({holder or 'another process holds its lock'})"
                "; verify it when that command is done"
            ) from None
        yield
    finally:
        os.close(fd)


def _store_checks(path: Path, report: VerifyReport) -> tuple[sqlite3.Connection | None,
                                                             WalReport | None]:
    """Checks 1-9; the open image (for the run checks) and the WAL analysis."""
    index = path / INDEX_FILENAME
    try:
        image, wal = database_image(index)
    except IntegrityError as exc:
        report.problems.append(f"index {index} is damaged: {exc}")
        return None, None
    if wal.damage is not None:
        report.problems.append(wal.damage.describe(wal.path))
    try:
        conn = open_image(image)
    except sqlite3.Error as exc:
        report.problems.append(f"index {index} is damaged: {exc}")
        return None, wal
    try:
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check(20)").fetchall()]
        if problems != ["ok"]:
            for problem in problems:
                report.problems.append(f"index {index}: integrity_check: {problem}")
        meta = _check_meta(conn, index, report)
        if meta is None:
            return conn, wal
        _check_schema(conn, index, report)
        blobs = _BlobChecker(path, report)
        _check_rounds(conn, index, meta, blobs, report)
        _check_ledger(conn, index, report)
        blobs.check_pack_sizes(conn)
    except (sqlite3.Error, UnicodeError, FedForgetError) as exc:
        report.problems.append(f"index {index} is damaged: {exc}")
    return conn, wal


def verify_store(
    directory: str | os.PathLike[str],
    *,
    head: str | os.PathLike[str] | None = None,
    public_key: Ed25519PublicKey | str | os.PathLike[str] | None = None,
    run_checks: bool = True,
) -> VerifyReport:
    """Check a history store, and the run directory around it, end to end.

    Parameters
    ----------
    directory
        A run directory created by :meth:`HistoryStore.create`.
    head
        A tree head file (as a client saves it) to check the store against, besides those
        in ``tree_heads.jsonl``.
    public_key
        The server's public key (or a PEM file of it) to check signatures with; by default
        ``keys/signing.pub`` of the run directory, with ``keys/manifest.json`` if present.
    run_checks
        Also check the run directory (heads, receipts, results, references, keys); False
        checks the store alone.

    Returns
    -------
    VerifyReport
        ``ok`` is True when every check passes; otherwise ``problems`` names the round,
        client and file of each failure.

    Raises
    ------
    HistoryError
        Only when ``directory`` is not a history store at all (no directory or no index),
        or another command is writing to it.
    StorageError
        When a file cannot be read at all (the report would otherwise blame the store).
    """
    path = Path(directory)
    index = path / INDEX_FILENAME
    if not path.is_dir():
        raise HistoryError(f"no history store at {path}: directory does not exist")
    if not index.is_file():
        raise HistoryError(f"{path} is not a history store: {index} is missing")
    report = VerifyReport(directory=path)
    with _shared_lock(path):
        conn, wal = _store_checks(path, report)
        try:
            if run_checks:
                audit_run_directory(
                    path, conn, wal, report, head=head, public_key=public_key,
                    verify_nested=lambda d: verify_store(d, run_checks=False),
                )
        finally:
            if conn is not None:
                conn.close()
    return report

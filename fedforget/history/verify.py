"""Offline verification of a history store.

:func:`verify_store` reads a run directory without the help of :class:`HistoryStore` and
reports every problem it finds: a damaged store gives a report, never an exception. Callers
that must fail closed use :meth:`VerifyReport.raise_for_problems`.

Checks
------
1. The index opens and records format :data:`~fedforget.history.store.FORMAT_NAME`, version
   :data:`~fedforget.history.store.FORMAT_VERSION`, a known codec and a retain interval >= 1.
2. Rounds are contiguous, 1..N.
3. Each round's record bytes match their recorded SHA-256 and agree with the index columns;
   ``global_before`` of round t equals ``global_after`` of round t - 1 (round 1: the initial
   model's digest).
4. Every referenced blob (initial model, each round's global model, each retained update)
   is listed in the index, its pack file exists and holds the blob's whole byte range, and
   the SHA-256 of those bytes, computed in chunks, matches its name.
5. Every pack file the index lists ends where its last listed blob ends (nothing appended).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedforget.errors import HistoryError, IntegrityError
from fedforget.history.records import RoundRecord
from fedforget.history.store import (
    BLOB_DIRNAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILENAME,
    BlobLocation,
)
from fedforget.tensors import CODECS, sha256_digest

__all__ = ["VerifyReport", "verify_store"]

_CHUNK = 1 << 20


@dataclass(slots=True)
class VerifyReport:
    """Outcome of :func:`verify_store`.

    Attributes
    ----------
    directory
        The run directory checked.
    problems
        One line per problem, naming the round, the client (if any) and the file.
    rounds_checked
        Number of round records examined.
    blobs_checked
        Number of distinct blob files hashed.
    """

    directory: Path
    problems: list[str] = field(default_factory=list)
    rounds_checked: int = 0
    blobs_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_for_problems(self) -> None:
        """Fail closed: raise :class:`IntegrityError` listing the problems, if any."""
        if self.problems:
            listed = "\n  ".join(self.problems)
            raise IntegrityError(
                f"history store {self.directory} failed verification with "
                f"{len(self.problems)} problem(s):\n  {listed}"
            )


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
        location = BlobLocation(digest, self._blob_root / str(pack), int(offset), int(nbytes))
        try:
            size, found = _hash_range(location)
        except FileNotFoundError:
            return f"{location} is missing: the file does not exist (expected {digest})"
        except OSError as exc:
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
            except OSError:
                continue  # reported with its blobs
            if size > end:
                self._report.problems.append(
                    f"pack {path}: {size - end} bytes after its last blob (the index lists "
                    f"{end} bytes of blobs in it)"
                )


def _open_index(index: Path) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(index))}?mode=rw"
    try:
        return sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error:
        ro = f"file:{urllib.parse.quote(str(index))}?mode=ro"
        return sqlite3.connect(ro, uri=True, isolation_level=None)


def _check_meta(conn: sqlite3.Connection, index: Path, report: VerifyReport) -> int | None:
    """Check the meta table; return the retain interval, or None if the index is unusable."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
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
    return retain_interval


def _rows(conn: sqlite3.Connection, sql: str) -> Iterator[tuple[Any, ...]]:
    cursor = conn.execute(sql)
    try:
        yield from cursor
    finally:
        cursor.close()


def _check_rounds(
    conn: sqlite3.Connection,
    index: Path,
    retain_interval: int,
    blobs: _BlobChecker,
    report: VerifyReport,
) -> None:
    initial = conn.execute(
        "SELECT m.digest, b.pack, b.offset, b.nbytes FROM models m "
        "LEFT JOIN blobs b ON b.digest = m.digest WHERE m.round = 0"
    ).fetchone()
    if initial is not None:
        blobs.check(initial[0], initial[1:], "initial model (round 0)", "blob")
    previous_after: str | None = None if initial is None else str(initial[0])

    expected_round = 1
    for row in _rows(
        conn,
        "SELECT r.round, r.global_before, r.global_after, r.record, r.record_digest, "
        "m.digest, b.pack, b.offset, b.nbytes FROM rounds r "
        "LEFT JOIN models m ON m.round = r.round LEFT JOIN blobs b ON b.digest = m.digest "
        "ORDER BY r.round",
    ):
        t, before, after, record_bytes, record_digest, model_digest = row[:6]
        model_blob = row[6:]
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
        if record is not None and (
            record.round != t or record.global_before != before or record.global_after != after
        ):
            report.problems.append(
                f"{where}: record in index {index} disagrees with its index columns "
                "(round, global_before or global_after)"
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
        "SELECT p.client_id, p.update_digest, p.retained, b.pack, b.offset, b.nbytes "
        "FROM participants p "
        "LEFT JOIN blobs b ON b.digest = p.update_digest WHERE p.round = ? "
        "ORDER BY p.client_id",
        (t,),
    ).fetchall()
    retained_round = (t - 1) % retain_interval == 0
    if record is not None:
        listed = [(p.client_id, p.update_digest, p.retained) for p in record.participants]
        indexed = [(str(c), str(d), bool(r)) for c, d, r, *_ in rows]
        if listed != indexed:
            report.problems.append(
                f"round {t}: participants in index {index} disagree with the round record"
            )
    for client_id, digest, retained, *blob in rows:
        where = f"round {t}, client {client_id!r}"
        if bool(retained) != retained_round:
            report.problems.append(
                f"{where}: update marked retained={bool(retained)}, but retain_interval "
                f"{retain_interval} gives retained={retained_round}"
            )
        if retained:
            blobs.check(str(digest), tuple(blob), where, "update blob")


def verify_store(directory: str | os.PathLike[str]) -> VerifyReport:
    """Check a history store end to end and report what is wrong.

    Parameters
    ----------
    directory
        A run directory created by :meth:`HistoryStore.create`.

    Returns
    -------
    VerifyReport
        ``ok`` is True when every check passes; otherwise ``problems`` names the round,
        client and file of each failure (missing, truncated or altered blobs, broken chain,
        altered records, gaps in the rounds).

    Raises
    ------
    HistoryError
        Only when ``directory`` is not a history store at all (no directory or no index).
    """
    path = Path(directory)
    index = path / INDEX_FILENAME
    if not path.is_dir():
        raise HistoryError(f"no history store at {path}: directory does not exist")
    if not index.is_file():
        raise HistoryError(f"{path} is not a history store: {index} is missing")
    report = VerifyReport(directory=path)
    try:
        conn = _open_index(index)
    except sqlite3.Error as exc:
        report.problems.append(f"index {index} cannot be opened: {exc}")
        return report
    try:
        retain_interval = _check_meta(conn, index, report)
        if retain_interval is None:
            return report
        blobs = _BlobChecker(path, report)
        _check_rounds(conn, index, retain_interval, blobs, report)
        blobs.check_pack_sizes(conn)
    except sqlite3.Error as exc:
        report.problems.append(f"index {index} is damaged: {exc}")
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    return report

"""Reading an SQLite index and its write-ahead log without writing a byte, and finding
damage that SQLite itself would pass over in silence.

SQLite in WAL mode appends each transaction's pages to ``<index>-wal`` as *frames*; a
transaction counts once its last frame, the *commit frame*, is in the log. A reader takes
the frames in order and stops at the first frame whose salts or checksum do not match
(https://www.sqlite.org/fileformat2.html#walformat): a damaged frame therefore silently
drops itself **and every later transaction**, and the store reads as shorter than it was.
:func:`analyse_wal` validates the frames itself and, past a bad frame, tries to pick the
checksum chain up again; if later frames chain on, committed transactions follow the damage
and the log is reported as damaged instead of being read as shorter.

Format (all header integers big-endian)::

    WAL header, 32 bytes: magic 0x377f0682 | 0x377f0683, format 3007000, page size,
        checkpoint sequence, salt-1, salt-2, checksum-1, checksum-2 (over bytes 0..24)
    frame header, 24 bytes: page number, database size in pages (commit frames; else 0),
        salt-1, salt-2 (copied from the WAL header), checksum-1, checksum-2
    frame data: one page

The checksum runs over 32-bit words (big-endian if the magic's last bit is 1, else
little-endian), two at a time, starting from the previous frame's checksum (the first frame:
the header's):

.. math::

    s_0 \\leftarrow s_0 + x_{2i} + s_1, \\qquad s_1 \\leftarrow s_1 + x_{2i+1} + s_0
    \\pmod{2^{32}}

over the frame header's first 8 bytes and the page. The recurrence is linear,
:math:`S \\leftarrow M S + (x_{2i},\\ x_{2i} + x_{2i+1})` with :math:`M = [[1, 1], [1, 2]]`,
so the checksum of a whole frame is computed for every frame at once with NumPy (products
of precomputed powers of :math:`M`, in wrapping 64-bit arithmetic, then mod :math:`2^{32}`).

Not in this module's scope: the ``-shm`` wal-index (a cache SQLite rebuilds from the log);
it is never read or written here.

:func:`database_image` applies the valid committed frames to the main file's pages, as a
reader would, and returns the bytes of the database a reader sees, to be opened in memory
(:func:`open_image`): no ``-shm`` is created, no WAL is checkpointed, nothing on disk changes,
and it works on a read-only or full disk.
"""

from __future__ import annotations

import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedforget.errors import IntegrityError
from fedforget.fileio import storage_error

__all__ = [
    "WAL_SUFFIX",
    "WalDamage",
    "WalReport",
    "analyse_wal",
    "database_image",
    "open_image",
    "read_index",
]

WAL_SUFFIX = "-wal"
_MAGIC_LE = 0x377F0682
_MAGIC_BE = 0x377F0683
_WAL_VERSION = 3007000
_HEADER = struct.Struct(">8I")
_FRAME_HEADER = struct.Struct(">6I")
_DB_MAGIC = b"SQLite format 3\x00"
_MASK = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class WalDamage:
    """Where and how a write-ahead log is damaged.

    Attributes
    ----------
    frame
        1-based number of the first bad frame (0: the WAL header).
    offset
        Byte offset of that frame (or of the header) in the file.
    reason
        What is wrong (checksum mismatch, salts, header).
    frames_lost
        Well-formed frames after the damage that a reader would ignore.
    commits_lost
        Commit frames among them (plus the bad frame, if it is one): committed transactions
        that would silently disappear.
    """

    frame: int
    offset: int
    reason: str
    frames_lost: int
    commits_lost: int

    def describe(self, path: Path) -> str:
        """One sentence naming the file, the frame and what would be lost."""
        where = "its header" if self.frame == 0 else f"frame {self.frame} (byte {self.offset})"
        return (
            f"{path} is damaged at {where}: {self.reason}; SQLite would silently ignore it "
            f"and the {self.frames_lost} frame(s) after it, which hold {self.commits_lost} "
            "committed transaction(s)"
        )


@dataclass(slots=True)
class WalReport:
    """What :func:`analyse_wal` found in a write-ahead log.

    Attributes
    ----------
    path
        The log file.
    page_size
        Page size of the log (0 when there is no usable header).
    frames
        ``(page number, commit size, offset of the page data)`` of every frame a reader
        uses: the valid frames up to the last valid commit frame.
    damage
        The damage found, or None when the log is intact (a torn, uncommitted tail left by a
        killed writer is not damage: no reader ever saw it as committed).
    tail_frames
        Frames after the last valid commit that no reader uses (an uncommitted tail, or
        frames of an earlier generation of the log).
    beyond
        With damage (or a torn commit): the frames after the last valid commit, through the
        last commit frame that chains on past the bad frame, as ``frames`` (what the lost
        transactions wrote).
    torn_commit
        Set when the last frame of the log is a commit frame that fails its checksum, with
        nothing valid after it: a write torn by a crash, or damage to the last committed
        transaction. Not counted as damage here; a caller holding signed tree heads decides
        (a head that covers more than the readable store proves the loss).
    """

    path: Path
    page_size: int = 0
    frames: list[tuple[int, int, int]] = field(default_factory=list)
    damage: WalDamage | None = None
    tail_frames: int = 0
    torn_commit: WalDamage | None = None
    beyond: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no committed transaction would be lost."""
        return self.damage is None


def _matrix_powers(count: int) -> np.ndarray:
    """``P[k] = M^k mod 2^64`` for k in 0..count-1, M = [[1, 1], [1, 2]], as (count, 2, 2)."""
    powers = np.empty((count, 2, 2), dtype=np.uint64)
    current = np.array([[1, 0], [0, 1]], dtype=np.uint64)
    step = np.array([[1, 1], [1, 2]], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(count):
            powers[k] = current
            current = step @ current
    return powers


_POWERS: dict[int, np.ndarray] = {}


def _powers(count: int) -> np.ndarray:
    cached = _POWERS.get(count)
    if cached is None:
        cached = _POWERS[count] = _matrix_powers(count)
    return cached


def _words(data: np.ndarray, big_endian: bool) -> np.ndarray:
    """Rows of bytes (n, 8k) as rows of 32-bit words (n, 2k), uint64."""
    dtype = ">u4" if big_endian else "<u4"
    return data.view(dtype).astype(np.uint64)


def _contributions(blocks: np.ndarray, big_endian: bool) -> np.ndarray:
    """For each row of bytes, ``C = Σ_i M^(n-1-i) (x_2i, x_2i + x_2i+1)`` (n word pairs),
    so that the checksum after the row is ``M^n S + C`` (mod 2^32). Shape (rows, 2)."""
    words = _words(blocks, big_endian)
    a = words[:, 0::2]
    b = words[:, 1::2]
    n = a.shape[1]
    p = _powers(n + 1)[:n][::-1]  # P[n-1-i] for i = 0..n-1
    with np.errstate(over="ignore"):
        v0 = a
        v1 = a + b
        c0 = v0 @ p[:, 0, 0] + v1 @ p[:, 0, 1]
        c1 = v0 @ p[:, 1, 0] + v1 @ p[:, 1, 1]
    return np.stack([c0 & _MASK, c1 & _MASK], axis=1)


def _advance(state: tuple[int, int], contribution: np.ndarray, pairs: int) -> tuple[int, int]:
    """``M^pairs S + C`` mod 2^32."""
    m = _powers(pairs + 1)[pairs]
    s0, s1 = state
    m00, m01, m10, m11 = (int(x) for x in (m[0, 0], m[0, 1], m[1, 0], m[1, 1]))
    return (
        (m00 * s0 + m01 * s1 + int(contribution[0])) & 0xFFFFFFFF,
        (m10 * s0 + m11 * s1 + int(contribution[1])) & 0xFFFFFFFF,
    )


def wal_checksum(data: bytes, big_endian: bool, state: tuple[int, int] = (0, 0)
                 ) -> tuple[int, int]:
    """The SQLite WAL checksum of ``data`` (a multiple of 8 bytes) from ``state``, word by
    word as the format defines it (the reference for the vectorised computation)."""
    if len(data) % 8:
        raise ValueError(f"checksummed data has {len(data)} bytes; expected a multiple of 8")
    s0, s1 = state
    fmt = ">" if big_endian else "<"
    for x0, x1 in struct.iter_unpack(fmt + "2I", data):
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def analyse_wal(path: str | Path, data: bytes | None = None) -> WalReport:
    """Validate the write-ahead log at ``path`` (or its bytes ``data``); never writes.

    A missing or empty log is intact. A log with an invalid header but whole frames after
    it is damaged (SQLite would ignore all of it). A frame with the log's salts whose
    checksum does not match is damage when a later frame chains on from it (from its stored
    or its recomputed checksum) or when it is itself a commit frame; otherwise it is the torn
    tail of a transaction that never committed.

    Raises
    ------
    StorageError
        If the log exists but cannot be read.
    """
    wal = Path(path)
    report = WalReport(path=wal)
    if data is None:
        try:
            data = wal.read_bytes()
        except FileNotFoundError:
            return report
        except OSError as exc:
            raise storage_error(exc, wal, "read") from exc
    if len(data) < _HEADER.size:
        return report  # no header was ever completed: nothing was committed through it
    magic, version, page_size, _, salt1, salt2, ck1, ck2 = _HEADER.unpack_from(data, 0)
    big_endian = magic == _MAGIC_BE
    header_ok = (
        magic in (_MAGIC_LE, _MAGIC_BE)
        and version == _WAL_VERSION
        and page_size >= 512
        and page_size <= 65536
        and page_size & (page_size - 1) == 0
        and wal_checksum(data[:24], big_endian) == (ck1, ck2)
    )
    if not header_ok:
        lost, commits = _frames_without_header(data)
        if lost:
            report.damage = WalDamage(
                frame=0, offset=0,
                reason="the WAL header does not validate (magic, version, page size or "
                "checksum)",
                frames_lost=lost, commits_lost=commits,
            )
        return report
    report.page_size = page_size
    frame_size = _FRAME_HEADER.size + page_size
    count = (len(data) - _HEADER.size) // frame_size
    if count == 0:
        return report
    raw = np.frombuffer(data, dtype=np.uint8, count=count * frame_size, offset=_HEADER.size)
    frames = raw.reshape(count, frame_size)
    # Checksummed bytes of each frame: header bytes 0..8 and the page.
    blocks = np.concatenate([frames[:, :8], frames[:, _FRAME_HEADER.size:]], axis=1)
    contributions = _contributions(np.ascontiguousarray(blocks), big_endian)
    pairs = blocks.shape[1] // 8
    headers = [_FRAME_HEADER.unpack_from(data, _HEADER.size + i * frame_size)
               for i in range(count)]

    def frame_ok(i: int, state: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
        pgno, _, s1, s2, c1, c2 = headers[i]
        computed = _advance(state, contributions[i], pairs)
        return (s1, s2) == (salt1, salt2) and pgno != 0 and computed == (c1, c2), computed

    state = (ck1, ck2)
    last_commit = -1
    bad = -1
    for i in range(count):
        ok, computed = frame_ok(i, state)
        if not ok:
            bad = i
            break
        state = computed
        if headers[i][1] != 0:
            last_commit = i
    report.frames = [
        (headers[i][0], headers[i][1], _HEADER.size + i * frame_size + _FRAME_HEADER.size)
        for i in range(last_commit + 1)
    ]
    report.tail_frames = count - (last_commit + 1)
    if bad < 0:
        return report
    # Past the first bad frame: does the chain pick up again, from the checksum stored in
    # the bad frame (its data or page number is damaged) or from the one recomputed for it
    # (its stored checksum is damaged)?
    _, commit, s1, s2, c1, c2 = headers[bad]
    same_generation = (s1, s2) == (salt1, salt2)
    _, recomputed = frame_ok(bad, state)
    chained, commits_after, last_beyond = 0, 0, bad if commit != 0 else -1
    for start in ((c1, c2), recomputed):
        st, n, k, last = start, 0, 0, -1
        for j in range(bad + 1, count):
            ok, st = frame_ok(j, st)
            if not ok:
                break
            n += 1
            if headers[j][1] != 0:
                k += 1
                last = j
        if n > chained:
            chained, commits_after = n, k
            last_beyond = max(last, last_beyond)
    report.beyond = [
        (headers[i][0], headers[i][1], _HEADER.size + i * frame_size + _FRAME_HEADER.size)
        for i in range(last_commit + 1, last_beyond + 1)
    ]
    if chained:
        what = (
            "its checksum does not match" if same_generation
            else "its salts differ from the header's, yet later frames continue the log"
        )
        report.damage = WalDamage(
            frame=bad + 1, offset=_HEADER.size + bad * frame_size, reason=what,
            frames_lost=chained,
            commits_lost=commits_after + (1 if same_generation and commit != 0 else 0),
        )
    elif same_generation and commit != 0:
        # The last frame written, a commit frame, fails its checksum: either a write torn by
        # a crash (the transaction never returned, nothing was signed for it) or damage to
        # the last committed transaction. Only the signed heads can tell: see torn_commit.
        report.torn_commit = WalDamage(
            frame=bad + 1, offset=_HEADER.size + bad * frame_size,
            reason="the last commit frame's checksum does not match", frames_lost=0,
            commits_lost=1,
        )
    return report


def _frames_without_header(data: bytes) -> tuple[int, int]:
    """(frames, commit frames) of a log whose header is unusable: the largest run of whole
    frames, for some page size SQLite allows, whose headers all carry the same salts."""
    best = (0, 0)
    for size in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        frame_size = size + _FRAME_HEADER.size
        count = (len(data) - _HEADER.size) // frame_size
        if count < 1:
            continue
        headers = [_FRAME_HEADER.unpack_from(data, _HEADER.size + i * frame_size)
                   for i in range(count)]
        salts = headers[0][2:4]
        run = 0
        commits = 0
        for h in headers:
            if h[2:4] != salts or h[0] == 0:
                break
            run += 1
            commits += h[1] != 0
        if run > best[0] and (run > 1 or commits):
            best = (run, commits)
    return best


def database_image(index: str | Path, wal: WalReport | None = None, *,
                   through_damage: bool = False) -> tuple[bytes, WalReport]:
    """The bytes of the database a reader of ``index`` sees, and the analysis of its WAL.

    The main file's pages with the valid committed WAL frames applied, in order, the size
    set by the last commit frame; the header's journal-mode bytes are set to rollback mode
    so that the image opens in memory. Nothing on disk is written.

    Parameters
    ----------
    wal
        The analysis of the log, if already made.
    through_damage
        Also apply the damaged frame and the frames that chain on after it (best effort, to
        show what the lost transactions held; the damaged page may itself be wrong).

    Raises
    ------
    StorageError
        If a file cannot be read.
    IntegrityError
        If the main file is not an SQLite database, or its page size differs from the WAL's.
    """
    path = Path(index)
    try:
        main = path.read_bytes()
    except OSError as exc:
        raise storage_error(exc, path, "read") from exc
    report = wal if wal is not None else analyse_wal(path.with_name(path.name + WAL_SUFFIX))
    frames = report.frames + (report.beyond if through_damage else [])
    if main and not main.startswith(_DB_MAGIC):
        raise IntegrityError(
            f"{path} is not an SQLite database: it starts with {main[:16]!r}, expected "
            f"{_DB_MAGIC!r}"
        )
    if not frames:
        image = bytearray(main)
    else:
        page_size = report.page_size
        if len(main) >= 100:
            (raw_size,) = struct.unpack_from(">H", main, 16)
            main_page = 65536 if raw_size == 1 else raw_size
            if main_page != page_size:
                raise IntegrityError(
                    f"{path} has page size {main_page}, its WAL {page_size}; expected the same"
                )
        image = bytearray(main)
        wal_data = Path(report.path).read_bytes()
        for pgno, commit, offset in frames:
            start = (pgno - 1) * page_size
            if len(image) < start + page_size:
                image.extend(bytes(start + page_size - len(image)))
            image[start:start + page_size] = wal_data[offset:offset + page_size]
            if commit:
                del image[commit * page_size:]
                if len(image) < commit * page_size:
                    image.extend(bytes(commit * page_size - len(image)))
    if len(image) >= 20:
        image[18] = 1  # file format write version: legacy (not WAL)
        image[19] = 1  # file format read version
    return bytes(image), report


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def open_image(image: bytes) -> sqlite3.Connection:
    """An in-memory, query-only connection to a database image."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    # A damaged text is read with U+FFFD in place of the bad bytes, so that the checks that
    # compare it report the value, instead of a UnicodeDecodeError stopping them.
    conn.text_factory = _lenient_text
    try:
        if image:
            conn.deserialize(image)
        conn.execute("PRAGMA query_only = 1")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def read_index(index: str | Path) -> tuple[sqlite3.Connection, WalReport]:
    """Open ``index`` (with its WAL) read-only in memory: ``(connection, WAL analysis)``.

    Raises
    ------
    StorageError, IntegrityError
        As :func:`database_image`; sqlite3.Error if the image does not open.
    """
    image, report = database_image(index)
    return open_image(image), report

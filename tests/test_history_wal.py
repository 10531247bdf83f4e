"""fedforget.history.wal: SQLite's write-ahead log read and validated without writing, and
HistoryStore.open refusing a log whose damage SQLite would pass over in silence."""

from __future__ import annotations

import shutil
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from fedforget.errors import HistoryError, IntegrityError
from fedforget.history import HistoryStore, ParticipantUpdate
from fedforget.history.wal import analyse_wal, database_image, open_image, wal_checksum


def model(t: int) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 8), t, dtype=np.float32)}


def crashed_copy(tmp_path: Path, rounds: int, name: str = "crashed") -> Path:
    """A store with ``rounds`` rounds, copied while it is open: its last transactions are
    in ``history.sqlite-wal`` only, as after a kill -9 (a clean close checkpoints them)."""
    live = tmp_path / "live"
    store = HistoryStore.create(live, run_config={"seed": 1})
    store.set_roster(["client-000", "client-001"])
    before = store.put_initial_model(model(0))
    for t in range(1, rounds + 1):
        before = store.commit_round(
            round=t, global_before=before, global_after=model(t), config={},
            participants=[ParticipantUpdate(f"client-00{k}", 5, 0.5, t, model(t + k))
                          for k in range(2)],
        ).global_after
    copy = tmp_path / name
    shutil.copytree(live, copy)
    store.close()
    return copy


def frames_of(wal: Path) -> tuple[int, bytes]:
    data = wal.read_bytes()
    (page_size,) = struct.unpack_from(">I", data, 8)
    return page_size, data


def late_frame(wal: Path) -> tuple[int, int]:
    """(1-based number, data offset) of a frame two thirds into the log: past the frames
    that created the schema, before the last rounds' commits."""
    page_size, data = frames_of(wal)
    count = (len(data) - 32) // (24 + page_size)
    i = (2 * count) // 3
    return i + 1, 32 + i * (24 + page_size) + 24 + 100


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_the_checksum_of_every_frame_sqlite_wrote_validates(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=4)
    wal = run / "history.sqlite-wal"
    page_size, data = frames_of(wal)
    report = analyse_wal(wal)
    assert report.ok and report.torn_commit is None
    assert report.page_size == page_size
    whole = (len(data) - 32) // (24 + page_size)
    assert len(report.frames) + report.tail_frames == whole and len(report.frames) > 4
    # The vectorised checksum agrees with the word-by-word definition on frame 1 and 2.
    big_endian = struct.unpack_from(">I", data, 0)[0] == 0x377F0683
    state = wal_checksum(data[:24], big_endian)
    assert state == struct.unpack_from(">2I", data, 24)
    for i in range(2):
        frame = data[32 + i * (24 + page_size): 32 + (i + 1) * (24 + page_size)]
        state = wal_checksum(frame[:8] + frame[24:], big_endian, state)
        assert state == struct.unpack_from(">2I", frame, 16)


def test_the_image_is_what_sqlite_reads_and_nothing_is_written(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=3)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    image, _ = database_image(run / "history.sqlite")
    conn = open_image(image)
    assert conn.execute("SELECT COUNT(*) FROM rounds").fetchone() == (3,)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with pytest.raises(sqlite3.OperationalError, match="readonly|query_only|attempt to write"):
        conn.execute("DELETE FROM rounds")
    conn.close()
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # byte for byte, and no -shm was created


def test_a_flipped_frame_in_the_middle_is_damage_naming_the_frame(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=4)
    wal = run / "history.sqlite-wal"
    number, offset = late_frame(wal)
    flip(wal, offset)  # page data of a frame two thirds in
    report = analyse_wal(wal)
    assert report.damage is not None and report.damage.frame == number
    assert report.damage.commits_lost >= 1
    # SQLite itself reads the log as shorter without a word:
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    conn = sqlite3.connect(plain / "history.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] < 4
    conn.close()


def test_open_refuses_a_damaged_log_before_sqlite_touches_it(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=4)
    wal = run / "history.sqlite-wal"
    number, offset = late_frame(wal)
    flip(wal, offset)
    damaged = wal.read_bytes()
    with pytest.raises(IntegrityError) as info:
        HistoryStore.open(run)
    message = str(info.value)
    assert f"history.sqlite-wal is damaged at frame {number} (byte " in message
    assert "SQLite would silently ignore it" in message
    assert "the frames past the damage hold rounds" in message
    assert wal.read_bytes() == damaged  # the evidence is kept
    with pytest.raises(IntegrityError):
        HistoryStore.open(run, read_only=True)


def test_a_damaged_header_is_damage(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=2)
    wal = run / "history.sqlite-wal"
    flip(wal, 17)  # salt-1
    report = analyse_wal(wal)
    assert report.damage is not None and report.damage.frame == 0
    assert report.damage.frames_lost > 0


def test_a_torn_uncommitted_tail_is_not_damage(tmp_path: Path) -> None:
    # A kill -9 mid-transaction leaves frames without a commit frame and a partial frame.
    run = crashed_copy(tmp_path, rounds=2)
    wal = run / "history.sqlite-wal"
    page_size, data = frames_of(wal)
    extra = bytearray(data[32:32 + 24 + page_size])
    struct.pack_into(">I", extra, 4, 0)  # not a commit frame (its checksum now fails too)
    wal.write_bytes(data + bytes(extra) + bytes(extra[:100]))
    report = analyse_wal(wal)
    assert report.ok and report.torn_commit is None
    with HistoryStore.open(run) as store:
        assert store.last_round == 2


def test_a_torn_last_commit_is_allowed_unless_a_signed_head_covers_it(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=3)
    wal = run / "history.sqlite-wal"
    flip(wal, wal.stat().st_size - 5)  # the last frame: round 3's commit frame
    report = analyse_wal(wal)
    assert report.damage is None and report.torn_commit is not None
    with HistoryStore.open(run, read_only=True) as store:
        assert store.last_round == 2  # what SQLite reads: the interrupted commit discarded
    # A head that signed size 3 shows that round 3 had committed: refused.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedforget.receipts.tree_head import sign_tree_head

    head = sign_tree_head(3, "ab" * 32, Ed25519PrivateKey.generate())
    (run / "tree_heads.jsonl").write_bytes(head.to_json())
    with pytest.raises(IntegrityError, match=r"rounds 3-3 are covered by a signed tree head"):
        HistoryStore.open(run)


def test_read_only_open_refuses_writes(tmp_path: Path) -> None:
    run = crashed_copy(tmp_path, rounds=1)
    with HistoryStore.open(run, read_only=True) as store:
        assert store.read_only and store.last_round == 1
        with pytest.raises(HistoryError, match="opened read-only"):
            store.set_roster(["client-009"])
        with pytest.raises(HistoryError, match="opened read-only"):
            store.put_initial_model(model(0))

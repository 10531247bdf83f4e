"""Tests of fedforget.history.verify: offline verification of a history store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedforget.errors import HistoryError, IntegrityError
from fedforget.history import HistoryStore, ParticipantUpdate, RoundRecord, verify_store
from fedforget.history.store import BlobLocation, blob_location
from fedforget.tensors import encode

# ---------------------------------------------------------------- helpers


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def model(t: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), t, dtype=np.float32), "b": np.full(3, -t, dtype=np.float32)}


def update(t: int, k: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), t + k / 4, dtype=np.float32), "b": np.zeros(3, np.float32)}


def build(directory: Path, rounds: int = 3, retain_interval: int = 1) -> list[RoundRecord]:
    """A store with `rounds` rounds of clients client-000 and client-001."""
    records = []
    with HistoryStore.create(
        directory, run_config={"seed": 1}, retain_interval=retain_interval
    ) as store:
        before = store.put_initial_model(model(0))
        for t in range(1, rounds + 1):
            record = store.commit_round(
                round=t,
                global_before=before,
                global_after=model(t),
                participants=[
                    ParticipantUpdate(f"client-{k:03d}", 5, 0.5, t, update(t, k)) for k in (0, 1)
                ],
                config={"local-epochs": 1},
            )
            before = record.global_after
            records.append(record)
    return records


def locate(directory: Path, digest: str) -> BlobLocation:
    """Where the index says blob ``digest`` is: a pack file of round t holds the retained
    updates of round t in client order, then the global model."""
    return blob_location(directory, digest)


def execute(directory: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(directory / "history.sqlite")
    conn.execute(sql, args)
    conn.commit()
    conn.close()


# ---------------------------------------------------------------- healthy stores


def test_a_healthy_store_verifies(tmp_path: Path) -> None:
    build(tmp_path / "run", rounds=3)
    report = verify_store(tmp_path / "run")
    assert report.ok
    assert report.problems == []
    assert report.rounds_checked == 3
    # θ0..θ3 and 2 updates in each of 3 rounds, all distinct.
    assert report.blobs_checked == 4 + 6
    report.raise_for_problems()  # no exception


def test_retention_is_respected_by_the_blob_count(tmp_path: Path) -> None:
    build(tmp_path / "run", rounds=5, retain_interval=2)
    report = verify_store(tmp_path / "run")
    assert report.ok
    assert report.blobs_checked == 6 + 2 * 3  # θ0..θ5, updates of rounds 1, 3, 5


def test_an_empty_store_verifies(tmp_path: Path) -> None:
    HistoryStore.create(tmp_path / "run", run_config={}).close()
    report = verify_store(tmp_path / "run")
    assert report.ok
    assert (report.rounds_checked, report.blobs_checked) == (0, 0)


def test_orphan_and_temporary_files_are_harmless(tmp_path: Path) -> None:
    # Packs of commits that never happened (a whole one and a half-written one).
    build(tmp_path / "run", rounds=1)
    blobs = tmp_path / "run" / "blobs"
    (blobs / "000002-deadbeef0000.pack").write_bytes(encode(model(9)))
    (blobs / "000002-deadbeef0001.pack").write_bytes(encode(model(9))[:20])
    assert verify_store(tmp_path / "run").ok


# ---------------------------------------------------------------- damaged blobs


def test_reports_a_flipped_byte_naming_round_client_and_file(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    digest = records[1].participant("client-001").update_digest
    loc = locate(tmp_path / "run", digest)
    data = bytearray(loc.path.read_bytes())
    data[loc.offset + loc.nbytes - 1] ^= 0x80  # the blob's last byte, inside its pack
    loc.path.write_bytes(bytes(data))
    altered = bytes(data[loc.offset : loc.offset + loc.nbytes])

    report = verify_store(tmp_path / "run")

    assert not report.ok
    assert report.problems == [
        f"round 2, client 'client-001': update blob bytes {loc.offset}.."
        f"{loc.offset + loc.nbytes} of {loc.path} is altered: its SHA-256 is "
        f"{digest_of(altered)}, expected {digest}"
    ]
    assert report.blobs_checked == 10


def test_reports_a_truncated_blob(tmp_path: Path) -> None:
    # Round 1's pack holds client-000's update, client-001's, then the model: cut the
    # model's last 10 bytes, then cut into client-001's update in round 2's pack.
    records = build(tmp_path / "run")
    model1 = locate(tmp_path / "run", records[0].global_after)
    os.truncate(model1.path, model1.offset + model1.nbytes - 10)
    model2 = locate(tmp_path / "run", records[1].global_after)
    update2 = locate(tmp_path / "run", records[1].participant("client-001").update_digest)
    assert update2.path == model2.path and update2.offset + update2.nbytes == model2.offset
    os.truncate(update2.path, update2.offset + 7)

    report = verify_store(tmp_path / "run")

    assert report.problems == [
        f"round 1, global model: blob bytes {model1.offset}..{model1.offset + model1.nbytes} "
        f"of {model1.path} is truncated: {model1.nbytes - 10} of {model1.nbytes} bytes present",
        f"round 2, global model: blob bytes {model2.offset}..{model2.offset + model2.nbytes} "
        f"of {model2.path} is truncated: 0 of {model2.nbytes} bytes present",
        f"round 2, client 'client-001': update blob bytes {update2.offset}.."
        f"{update2.offset + update2.nbytes} of {update2.path} is truncated: 7 of "
        f"{update2.nbytes} bytes present",
    ]


def test_reports_a_deleted_pack_naming_each_blob(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    model3 = locate(tmp_path / "run", records[2].global_after)
    update0, update1 = (
        locate(tmp_path / "run", records[2].participant(c).update_digest)
        for c in ("client-000", "client-001")
    )
    model3.path.unlink()  # round 3's pack: its two updates and its model

    report = verify_store(tmp_path / "run")

    def missing(loc: BlobLocation) -> str:
        return (
            f"blob bytes {loc.offset}..{loc.offset + loc.nbytes} of {model3.path} is missing: "
            f"the file does not exist (expected {loc.digest})"
        )

    assert report.problems == [
        f"round 3, global model: {missing(model3)}",
        f"round 3, client 'client-000': update {missing(update0)}",
        f"round 3, client 'client-001': update {missing(update1)}",
    ]
    assert report.blobs_checked == 7


def test_reports_damaged_global_and_initial_models(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    initial = records[0].global_before
    locate(tmp_path / "run", initial).path.unlink()
    after2 = locate(tmp_path / "run", records[1].global_after)
    data = bytearray(after2.path.read_bytes())
    data[after2.offset] ^= 0x01  # the first byte of the model, in the middle of the pack
    after2.path.write_bytes(bytes(data))

    problems = verify_store(tmp_path / "run").problems

    assert problems[0].startswith("initial model (round 0): blob bytes 0..")
    assert problems[0].endswith(f"is missing: the file does not exist (expected {initial})")
    assert problems[1].startswith(
        f"round 2, global model: blob bytes {after2.offset}..{after2.offset + after2.nbytes} "
        f"of {after2.path} is altered: its SHA-256 is sha256:"
    )
    assert len(problems) == 2


def test_reports_bytes_appended_to_a_pack(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    after2 = locate(tmp_path / "run", records[1].global_after)
    size = after2.path.stat().st_size
    assert size == after2.offset + after2.nbytes
    with after2.path.open("ab") as f:
        f.write(b"\x00\x00")

    assert verify_store(tmp_path / "run").problems == [
        f"pack {after2.path}: 2 bytes after its last blob (the index lists {size} bytes of "
        "blobs in it)"
    ]


def test_reports_an_index_row_pointing_to_another_blob(tmp_path: Path) -> None:
    # The index says client-000's round-1 update is where client-001's is: bytes that are
    # whole and of the right length, but not the blob named.
    records = build(tmp_path / "run")
    digest0 = records[0].participant("client-000").update_digest
    other = locate(tmp_path / "run", records[0].participant("client-001").update_digest)
    execute(tmp_path / "run", "UPDATE blobs SET offset = ? WHERE digest = ?",
            other.offset, digest0)

    problems = verify_store(tmp_path / "run").problems

    assert problems == [
        f"round 1, client 'client-000': update blob bytes {other.offset}.."
        f"{other.offset + other.nbytes} of {other.path} is altered: its SHA-256 is "
        f"{other.digest}, expected {digest0}"
    ]


def test_a_shared_blob_is_reported_for_each_use(tmp_path: Path) -> None:
    # Both clients send the same update in round 1: one blob, two references.
    with HistoryStore.create(tmp_path / "run", run_config={}) as store:
        theta0 = store.put_initial_model(model(0))
        same = update(1, 0)
        record = store.commit_round(
            round=1,
            global_before=theta0,
            global_after=model(1),
            participants=[ParticipantUpdate(f"client-{k}", 1, 0.5, 0, same) for k in (0, 1)],
            config={},
        )
    shared = locate(tmp_path / "run", record.participants[0].update_digest)
    data = bytearray(shared.path.read_bytes())
    data[shared.offset + 20] ^= 0x01
    shared.path.write_bytes(bytes(data))
    problems = verify_store(tmp_path / "run").problems
    assert [p.split(":")[0] for p in problems] == [
        "round 1, client 'client-0'",
        "round 1, client 'client-1'",
    ]


# ---------------------------------------------------------------- damaged index


def test_reports_an_altered_record(tmp_path: Path) -> None:
    build(tmp_path / "run")
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    (record,) = conn.execute("SELECT record FROM rounds WHERE round = 2").fetchone()
    conn.close()
    execute(
        tmp_path / "run",
        "UPDATE rounds SET record = ? WHERE round = 2",
        record.replace(b'"weight":0.5', b'"weight":0.6', 1),
    )
    problems = verify_store(tmp_path / "run").problems
    assert len(problems) == 1
    assert problems[0].startswith("round 2: record in ")
    assert "history.sqlite is altered: its SHA-256 is sha256:" in problems[0]


def test_reports_a_broken_chain(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    execute(
        tmp_path / "run",
        "UPDATE rounds SET global_before = ? WHERE round = 3",
        records[0].global_after,
    )
    problems = verify_store(tmp_path / "run").problems
    assert problems[0] == (
        f"round 3: global_before is {records[0].global_after}, expected "
        f"{records[1].global_after} (global_after of round 2)"
    )
    assert "disagrees with its index columns" in problems[1]


def test_reports_a_missing_round(tmp_path: Path) -> None:
    build(tmp_path / "run")
    execute(tmp_path / "run", "DELETE FROM participants WHERE round = 2")
    execute(tmp_path / "run", "DELETE FROM models WHERE round = 2")
    execute(tmp_path / "run", "DELETE FROM rounds WHERE round = 2")
    problems = verify_store(tmp_path / "run").problems
    assert problems[0].startswith("round 3: rounds are not contiguous: expected round 2")
    assert problems[1].startswith("round 3: global_before is ")
    assert problems[1].endswith("(global_after of round 2)")


def test_reports_an_unknown_format_version_without_raising(tmp_path: Path) -> None:
    build(tmp_path / "run", rounds=1)
    execute(tmp_path / "run", "UPDATE meta SET value = '7' WHERE key = 'format_version'")
    report = verify_store(tmp_path / "run")
    assert report.problems == [
        f"index {tmp_path / 'run' / 'history.sqlite'}: format version is '7', expected 3"
    ]


def test_reports_an_index_that_is_not_sqlite(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.sqlite").write_bytes(b"garbage " * 512)
    report = verify_store(tmp_path / "run")
    assert not report.ok
    assert "is damaged: " in report.problems[0]
    assert "is not an SQLite database: it starts with b'garbage garbage '" in report.problems[0]


def test_raises_only_when_the_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"no history store at .*nowhere"):
        verify_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoryError, match=r"history.sqlite is missing"):
        verify_store(tmp_path / "empty")


def test_raise_for_problems_fails_closed(tmp_path: Path) -> None:
    records = build(tmp_path / "run", rounds=1)
    locate(tmp_path / "run", records[0].global_before).path.unlink()  # θ0's pack: θ0 alone
    report = verify_store(tmp_path / "run")
    with pytest.raises(
        IntegrityError,
        match=r"failed verification with 1 problem\(s\):\n  initial model \(round 0\): blob ",
    ):
        report.raise_for_problems()

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


def blob_file(directory: Path, digest: str) -> Path:
    hexdigest = digest.removeprefix("sha256:")
    return directory / "blobs" / hexdigest[:2] / hexdigest


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
    build(tmp_path / "run", rounds=1)
    orphan = encode(model(9))
    path = blob_file(tmp_path / "run", digest_of(orphan))
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(orphan)
    (path.parent / ".tmp-deadbeef-1-00").write_bytes(b"half a blob")
    assert verify_store(tmp_path / "run").ok


# ---------------------------------------------------------------- damaged blobs


def test_reports_a_flipped_byte_naming_round_client_and_file(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    digest = records[1].participant("client-001").update_digest
    path = blob_file(tmp_path / "run", digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))

    report = verify_store(tmp_path / "run")

    assert not report.ok
    assert report.problems == [
        f"round 2, client 'client-001': update blob {path} is altered: its SHA-256 is "
        f"{digest_of(bytes(data))}, expected {digest}"
    ]
    assert report.blobs_checked == 10


def test_reports_a_truncated_blob(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    digest = records[0].participant("client-000").update_digest
    path = blob_file(tmp_path / "run", digest)
    size = path.stat().st_size
    os.truncate(path, size - 10)

    report = verify_store(tmp_path / "run")

    assert report.problems == [
        f"round 1, client 'client-000': update blob {path} is truncated or overwritten: "
        f"{size - 10} bytes, expected {size}"
    ]


def test_reports_a_deleted_blob(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    digest = records[2].participant("client-000").update_digest
    path = blob_file(tmp_path / "run", digest)
    path.unlink()

    report = verify_store(tmp_path / "run")

    assert report.problems == [
        f"round 3, client 'client-000': update blob {path} is missing (expected {digest})"
    ]
    assert report.blobs_checked == 9


def test_reports_damaged_global_and_initial_models(tmp_path: Path) -> None:
    records = build(tmp_path / "run")
    initial = records[0].global_before
    blob_file(tmp_path / "run", initial).unlink()
    after2 = blob_file(tmp_path / "run", records[1].global_after)
    after2.write_bytes(after2.read_bytes() + b"\x00")

    problems = verify_store(tmp_path / "run").problems

    assert problems[0].startswith("initial model (round 0): blob ")
    assert problems[0].endswith(f"is missing (expected {initial})")
    assert problems[1].startswith(f"round 2, global model: blob {after2} is truncated")
    assert len(problems) == 2


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
    blob_file(tmp_path / "run", record.participants[0].update_digest).unlink()
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
        f"index {tmp_path / 'run' / 'history.sqlite'}: format version is '7', expected 1"
    ]


def test_reports_an_index_that_is_not_sqlite(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.sqlite").write_bytes(b"garbage " * 512)
    report = verify_store(tmp_path / "run")
    assert not report.ok
    assert "is damaged: file is not a database" in report.problems[0]


def test_raises_only_when_the_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"no history store at .*nowhere"):
        verify_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoryError, match=r"history.sqlite is missing"):
        verify_store(tmp_path / "empty")


def test_raise_for_problems_fails_closed(tmp_path: Path) -> None:
    records = build(tmp_path / "run", rounds=1)
    blob_file(tmp_path / "run", records[0].global_after).unlink()
    report = verify_store(tmp_path / "run")
    with pytest.raises(
        IntegrityError, match=r"failed verification with 1 problem\(s\):\n  round 1"
    ):
        report.raise_for_problems()

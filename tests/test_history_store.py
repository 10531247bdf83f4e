"""Tests of the history records and the embedded HistoryStore."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fedforget.history.store as store_module
from fedforget.errors import ConfigError, HistoryError, IntegrityError
from fedforget.history import (
    HistoryStore,
    ParticipantRecord,
    ParticipantUpdate,
    RefusedReply,
    RoundRecord,
    verify_store,
)
from fedforget.tensors import MAGIC, encode

# ---------------------------------------------------------------- helpers

WHEN = "2025-01-31T12:00:00.000000Z"
RUN = "sha256:" + "9" * 64  # a run-context digest, for records built by hand


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def model(t: int) -> dict[str, np.ndarray]:
    """θ after round t (t = 0: initial model): w[i, j] = t + i/10 + j/100, b = -t."""
    i, j = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    return {
        "w": (t + i / 10 + j / 100).astype(np.float32),
        "b": np.full(4, -t, dtype=np.float32),
    }


def update(t: int, k: int) -> dict[str, np.ndarray]:
    """Δ of client k in round t: every entry equals t + k/8 (exact in every codec)."""
    return {
        "w": np.full((3, 4), t + k / 8, dtype=np.float32),
        "b": np.full(4, -(t + k / 8), dtype=np.float32),
    }


def participant(t: int, k: int, **changes: object) -> ParticipantUpdate:
    fields: dict[str, object] = {
        "client_id": f"client-{k:03d}",
        "num_examples": 10 * (k + 1),
        "weight": 0.5,
        "seed": 1000 * t + k,
        "update": update(t, k),
        "metrics": {"train-loss": 1.0 / (t + k)},
    }
    fields.update(changes)
    return ParticipantUpdate(**fields)  # type: ignore[arg-type]


def commit(store: HistoryStore, t: int, clients: tuple[int, ...] = (0, 1)) -> RoundRecord:
    before = store.initial_model_digest if t == 1 else digest_of(encode(model(t - 1)))
    assert before is not None
    return store.commit_round(
        round=t,
        global_before=before,
        global_after=model(t),
        participants=[participant(t, k) for k in clients],
        config={"learning-rate": 0.1, "local-epochs": 1},
        committed_at=WHEN,
    )


def new_store(path: Path, *, codec: str = "fp32", retain_interval: int = 1) -> HistoryStore:
    store = HistoryStore.create(
        path,
        run_config={"seed": 7, "dataset": "digits"},
        codec=codec,
        retain_interval=retain_interval,
    )
    store.put_initial_model(model(0))
    return store


def snapshot(directory: Path) -> tuple[dict[str, bytes], list[str]]:
    """Every blob file with its bytes, and a logical dump of the index."""
    files = {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted((directory / "blobs").rglob("*"))
        if p.is_file()
    }
    conn = sqlite3.connect(directory / "history.sqlite")
    dump = list(conn.iterdump())
    conn.close()
    return files, dump


def locate(directory: Path, digest: str) -> store_module.BlobLocation:
    """Where the index says blob ``digest`` is (its pack file, offset and length)."""
    return store_module.blob_location(directory, digest)


def blob_bytes(location: store_module.BlobLocation) -> bytes:
    data = location.path.read_bytes()
    return data[location.offset : location.offset + location.nbytes]


def packs(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "blobs").rglob("*") if p.is_file())


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- records


def test_participant_record_canonical_bytes_by_hand() -> None:
    record = ParticipantRecord(
        client_id="client-003",
        num_examples=12,
        weight=0.25,
        update_digest="sha256:" + "ab" * 32,
        retained=True,
        metrics={"train-loss": 1},
        seed=5,
    )
    # RFC 8785: 1.0 is written as 1 (ECMAScript number form); the seed is a decimal string.
    expected = (
        b'{"client_id":"client-003","metrics":{"train-loss":1},"num_examples":12,'
        b'"retained":true,"seed":"5","update_digest":"sha256:' + b"ab" * 32 + b'","weight":0.25}'
    )
    assert record.canonical_bytes() == expected


def test_a_63_bit_seed_survives_the_record_but_a_json_number_seed_is_refused() -> None:
    seed = 2**63 - 25  # beyond 2**53: a JSON number would round it
    record = ParticipantRecord("client-003", 12, 0.25, "sha256:" + "ab" * 32, True, {}, seed)
    assert b'"seed":"9223372036854775783"' in record.canonical_bytes()
    assert ParticipantRecord.from_dict(record.to_dict()).seed == seed
    with pytest.raises(HistoryError, match=r"seed is 5; expected a decimal string"):
        ParticipantRecord.from_dict({**record.to_dict(), "seed": 5})


def test_round_record_sorts_participants_and_round_trips() -> None:
    def p(cid: str) -> ParticipantRecord:
        return ParticipantRecord(cid, 1, 0.5, "sha256:" + "0" * 64, False, {}, 0)

    record = RoundRecord(
        round=2,
        global_before="sha256:" + "1" * 64,
        global_after="sha256:" + "2" * 64,
        participants=(p("client-b"), p("client-a")),
        refused=(RefusedReply("client-z", "NaN in update"), RefusedReply("client-c", "late")),
        config={"local-epochs": 2, "schedule": (1, 2)},
        committed_at=WHEN,
        run_digest=RUN,
    )
    assert record.client_ids == ("client-a", "client-b")
    assert [r.client_id for r in record.refused] == ["client-c", "client-z"]
    assert record.config == {"local-epochs": 2, "schedule": [1, 2]}
    again = RoundRecord.from_bytes(record.canonical_bytes())
    assert again == record
    assert hash(again) == hash(record)
    assert pickle.loads(pickle.dumps(record)) == record


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight": float("nan")}, r"participant 'c' weight is nan; expected a finite number"),
        ({"metrics": {"loss": float("inf")}}, r"metric 'loss' is inf; expected a finite"),
        ({"num_examples": -1}, r"num_examples is -1; expected at least 0"),
        ({"num_examples": True}, r"num_examples is True; expected an integer"),
        ({"update_digest": "md5:00"}, r"update_digest is 'md5:00'; expected 'sha256:'"),
        ({"client_id": ""}, r"client_id is ''; expected a non-empty string"),
    ],
)
def test_participant_record_refuses_bad_fields(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "client_id": "c",
        "num_examples": 1,
        "weight": 1.0,
        "update_digest": "sha256:" + "0" * 64,
        "retained": True,
        "metrics": {},
        "seed": 0,
    }
    fields.update(changes)
    with pytest.raises(HistoryError, match=message):
        ParticipantRecord(**fields)  # type: ignore[arg-type]


def test_round_record_refuses_a_client_listed_twice() -> None:
    p = ParticipantRecord("client-a", 1, 1.0, "sha256:" + "0" * 64, True, {}, 0)
    with pytest.raises(HistoryError, match=r"round 1 lists client 'client-a' more than once"):
        RoundRecord(
            round=1,
            global_before="sha256:" + "1" * 64,
            global_after="sha256:" + "2" * 64,
            participants=(p,),
            refused=(RefusedReply("client-a", "late"),),
            committed_at=WHEN,
            run_digest=RUN,
        )


def test_round_record_refuses_a_non_utc_timestamp() -> None:
    with pytest.raises(HistoryError, match=r"committed_at is '2025-01-31 12:00'; expected RFC"):
        RoundRecord(
            round=1,
            global_before="sha256:" + "1" * 64,
            global_after="sha256:" + "2" * 64,
            participants=(),
            committed_at="2025-01-31 12:00",
            run_digest=RUN,
        )


# ---------------------------------------------------------------- create / open


def test_create_commit_reopen_round_trip(tmp_path: Path) -> None:
    # Prepare
    run = tmp_path / "run"
    store = HistoryStore.create(run, run_config={"seed": 7, "dataset": "digits"})
    theta0 = store.put_initial_model(model(0))

    # Execute: client 1 replies first, client 0 second; client 2 is refused in round 2.
    rec1 = store.commit_round(
        round=1,
        global_before=theta0,
        global_after=model(1),
        participants=[participant(1, 1), participant(1, 0)],
        config={"learning-rate": 0.1},
        committed_at=WHEN,
    )
    rec2 = store.commit_round(
        round=2,
        global_before=rec1.global_after,
        global_after=model(2),
        participants=[participant(2, 0)],
        refused=[RefusedReply("client-002", "update holds NaN")],
        config={"learning-rate": 0.05},
    )
    store.close()

    # Assert
    with HistoryStore.open(run) as reopened:
        assert reopened.last_round == 2
        assert reopened.codec == "fp32"
        assert reopened.retain_interval == 1
        assert reopened.run_config == {"seed": 7, "dataset": "digits"}
        assert theta0 == digest_of(encode(model(0)))
        assert reopened.initial_model_digest == theta0
        r1 = reopened.round(1)
        assert r1 == rec1
        assert r1.client_ids == ("client-000", "client-001")
        p1 = r1.participant("client-001")
        assert (p1.num_examples, p1.weight, p1.seed, p1.retained) == (20, 0.5, 1001, True)
        assert p1.metrics == {"train-loss": 0.5}
        assert p1.update_digest == digest_of(encode(update(1, 1)))
        assert r1.global_after == digest_of(encode(model(1)))
        assert r1.config == {"learning-rate": 0.1}
        assert reopened.round(2).refused == (RefusedReply("client-002", "update holds NaN"),)
        assert [r.round for r in reopened.rounds()] == [1, 2]
        assert list(reopened.rounds())[1] == rec2
        for t in (0, 1, 2):
            got = reopened.global_model(t)
            assert list(got) == ["w", "b"]
            np.testing.assert_array_equal(got["w"], model(t)["w"])
            np.testing.assert_array_equal(got["b"], model(t)["b"])
        np.testing.assert_array_equal(reopened.client_update(1, "client-001")["w"], 1.125)
        assert reopened.clients() == {"client-000": [1, 2], "client-001": [1]}


def test_summary_counts_blobs_by_hand(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        commit(store, 1)
        commit(store, 2)
        summary = store.summary()
    # θ0, θ1, θ2 and 2 updates in each of 2 rounds: 7 distinct blobs in 3 packs (round 0:
    # θ0; rounds 1 and 2: two updates and the model each), sizes as on disk.
    on_disk = packs(tmp_path / "run")
    assert len(on_disk) == 3
    assert summary["num_blobs"] == 7
    assert summary["bytes_stored"] == sum(p.stat().st_size for p in on_disk)
    assert summary["model_bytes"] == sum(len(encode(model(t))) for t in range(3))
    assert summary["update_bytes"] == sum(len(encode(update(t, k))) for t in (1, 2) for k in (0, 1))
    assert summary["rounds"] == 2
    assert summary["retained_rounds"] == [1, 2]
    assert summary["clients"] == {"client-000": [1, 2], "client-001": [1, 2]}
    assert summary["initial_model_digest"] == digest_of(encode(model(0)))
    assert summary["final_model_digest"] == digest_of(encode(model(2)))
    assert summary["codec"] == "fp32"
    assert summary["run_config"] == {"seed": 7, "dataset": "digits"}


def test_summary_of_a_store_without_rounds(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        summary = store.summary()
    assert summary["rounds"] == 0
    assert summary["final_model_digest"] == digest_of(encode(model(0)))


def test_index_keeps_each_records_canonical_bytes_and_sha256(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        record = commit(store, 1)
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    stored, stored_digest = conn.execute(
        "SELECT record, record_digest FROM rounds WHERE round = 1"
    ).fetchone()
    conn.close()
    assert stored == record.canonical_bytes()
    assert stored_digest == digest_of(record.canonical_bytes())


def test_create_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    new_store(tmp_path / "run").close()
    with pytest.raises(
        HistoryError,
        match=r"refusing to create a history store in .*run: the directory is not empty "
        r"\(it holds a history store\)",
    ):
        HistoryStore.create(tmp_path / "run", run_config={})


def test_create_validates_codec_and_retain_interval(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"codec is 'fp8'; expected one of fp32, fp16, bf16"):
        HistoryStore.create(tmp_path / "a", run_config={}, codec="fp8")
    with pytest.raises(ConfigError, match=r"retain_interval is 0; expected an integer >= 1"):
        HistoryStore.create(tmp_path / "b", run_config={}, retain_interval=0)
    with pytest.raises(ConfigError, match=r"run_config cannot be stored"):
        HistoryStore.create(tmp_path / "c", run_config={"lr": float("nan")})
    assert not any(tmp_path.iterdir())  # nothing half-created


def test_open_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"no history store at .*missing: directory does not"):
        HistoryStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoryError, match=r"is not a history store: .*history.sqlite is missing"):
        HistoryStore.open(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "history.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HistoryError, match=r"history.sqlite is not a history index"):
        HistoryStore.open(tmp_path / "junk")


def test_open_refuses_an_unknown_format_version(tmp_path: Path) -> None:
    new_store(tmp_path / "run").close()
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    with pytest.raises(
        HistoryError,
        match=r"has format version '4'; this fedforget reads version 3 only; train the run "
        r"again into a new directory$",
    ):
        HistoryStore.open(tmp_path / "run")


def test_open_refuses_a_version_1_store_saying_why(tmp_path: Path) -> None:
    new_store(tmp_path / "run").close()
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    with pytest.raises(
        HistoryError,
        match=r"has format version '1'; this fedforget reads version 3 only \(version 1 "
        r"stores, one file per blob, were written before packs\); train the run again",
    ):
        HistoryStore.open(tmp_path / "run")


def test_open_refuses_a_version_2_store_saying_why(tmp_path: Path) -> None:
    new_store(tmp_path / "run").close()
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    with pytest.raises(
        HistoryError,
        match=r"has format version '2'; this fedforget reads version 3 only \(version 2 "
        r"stores hash their records as Python's sorted-key JSON, not RFC 8785",
    ):
        HistoryStore.open(tmp_path / "run")


def test_initial_model_is_stored_once(tmp_path: Path) -> None:
    with (
        new_store(tmp_path / "run") as store,
        pytest.raises(HistoryError, match=r"already holds an initial model \(sha256:"),
    ):
        store.put_initial_model(model(5))


def test_round_one_needs_an_initial_model(tmp_path: Path) -> None:
    with (
        HistoryStore.create(tmp_path / "run", run_config={}) as store,
        pytest.raises(HistoryError, match=r"no initial model; call put_initial_model first"),
    ):
        store.commit_round(
            round=1,
            global_before="sha256:" + "0" * 64,
            global_after=model(1),
            participants=[],
            config={},
        )


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run")
    store.close()
    with pytest.raises(HistoryError, match=r"history store .*run is closed"):
        _ = store.last_round


def test_run_config_is_a_copy(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        store.run_config["seed"] = 99
        assert store.run_config["seed"] == 7


# ---------------------------------------------------------------- refusals leave it unchanged


def test_out_of_order_round_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run")
    commit(store, 1)
    before = snapshot(tmp_path / "run")
    with pytest.raises(
        HistoryError,
        match=r"cannot commit round 3 to .*run: the last committed round is 1, expected round 2",
    ):
        store.commit_round(
            round=3,
            global_before=digest_of(encode(model(1))),
            global_after=model(3),
            participants=[participant(3, 0)],
            config={},
        )
    with pytest.raises(HistoryError, match=r"cannot commit round 1 .* expected round 2"):
        commit(store, 1)
    assert store.last_round == 1
    store.close()
    assert snapshot(tmp_path / "run") == before
    assert verify_store(tmp_path / "run").ok


def test_wrong_global_before_is_refused_naming_both_digests(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run")
    commit(store, 1)
    before = snapshot(tmp_path / "run")
    wrong = digest_of(encode(model(0)))
    right = digest_of(encode(model(1)))
    with pytest.raises(HistoryError) as info:
        store.commit_round(
            round=2,
            global_before=wrong,
            global_after=model(2),
            participants=[participant(2, 0)],
            config={},
        )
    assert str(info.value) == (
        f"cannot commit round 2: global_before is '{wrong}', expected '{right}' "
        "(global_after of round 1)"
    )
    assert store.last_round == 1
    store.close()
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize(
    ("participants", "refused", "message"),
    [
        ([participant(1, 0), participant(1, 0)], [], r"lists client 'client-000' more than once"),
        ([participant(1, 0)], [RefusedReply("client-000", "late")], r"more than once"),
        (
            [participant(1, 0, update={"w": np.zeros((3, 4), np.float32)})],
            [],
            r"round 1, client 'client-000': update has keys \['w'\]; expected the model's keys "
            r"\['b', 'w'\]",
        ),
        (
            [participant(1, 0, update={"w": np.zeros((4, 3)), "b": np.zeros(4)})],
            [],
            r"round 1, client 'client-000': update tensor 'w' has shape \(4, 3\); expected "
            r"\(3, 4\)",
        ),
        ([participant(1, 0, weight=float("inf"))], [], r"weight is inf; expected a finite"),
        ([participant(1, 0, metrics={"acc": "high"})], [], r"metric 'acc' is 'high'"),
    ],
)
def test_bad_participants_are_refused_before_anything_is_written(
    tmp_path: Path,
    participants: list[ParticipantUpdate],
    refused: list[RefusedReply],
    message: str,
) -> None:
    store = new_store(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(HistoryError, match=message):
        store.commit_round(
            round=1,
            global_before=digest_of(encode(model(0))),
            global_after=model(1),
            participants=participants,
            refused=refused,
            config={},
        )
    assert store.last_round == 0
    store.close()
    assert snapshot(tmp_path / "run") == before


def test_a_failure_after_the_blobs_leaves_the_last_round_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a crash between writing round 2's blobs and committing its index rows.
    store = new_store(tmp_path / "run")
    commit(store, 1)

    def fail(path: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store_module, "_fsync_directory", fail)
    with pytest.raises(OSError, match="disk gone"):
        commit(store, 2)
    monkeypatch.undo()
    assert store.last_round == 1
    assert verify_store(tmp_path / "run").ok  # the orphan pack is harmless
    before = packs(tmp_path / "run")
    orphan = before[-1] if before[-1].name.startswith("000002-") else before[0]
    assert orphan.name.startswith("000002-")  # round 2's pack, written, never referenced
    assert orphan.read_bytes() == encode(update(2, 0)) + encode(update(2, 1)) + encode(model(2))
    flip_byte(orphan)  # a damaged orphan is never read: the round goes to a new pack
    record = commit(store, 2)
    assert record.global_after == digest_of(encode(model(2)))
    location = store.blob_location(record.participant("client-001").update_digest)
    assert location.path not in before
    assert blob_bytes(location) == encode(update(2, 1))
    store.close()
    assert verify_store(tmp_path / "run").ok


# ---------------------------------------------------------------- retention


def test_retention_interval_two_keeps_rounds_one_three_five(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run", retain_interval=2)
    for t in range(1, 6):
        commit(store, t)
    assert [store.is_retained(t) for t in range(1, 7)] == [True, False, True, False, True, False]
    for t in range(1, 6):
        record = store.round(t)
        for k in (0, 1):
            p = record.participant(f"client-{k:03d}")
            assert p.update_digest == digest_of(encode(update(t, k)))  # digest every round
            assert p.retained == (t in (1, 3, 5))
    np.testing.assert_array_equal(store.client_update(5, "client-001")["b"], -5.125)
    with pytest.raises(
        HistoryError,
        match=r"the update of client 'client-001' in round 4 was not retained: retain_interval "
        r"2 keeps rounds 1, 3, 5, \.\.\.",
    ):
        store.client_update(4, "client-001")
    # 6 models + 2 updates in each of rounds 1, 3, 5: 12 blobs in 6 packs (one per commit),
    # and nothing else on disk.
    files = packs(tmp_path / "run")
    assert len(files) == 6
    assert store.summary()["num_blobs"] == 12
    assert sum(f.stat().st_size for f in files) == (
        sum(len(encode(model(t))) for t in range(6))
        + sum(len(encode(update(t, k))) for t in (1, 3, 5) for k in (0, 1))
    )
    assert store.summary()["retained_rounds"] == [1, 3, 5]
    store.close()


def test_client_update_names_unknown_round_and_client(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        commit(store, 1)
        with pytest.raises(
            HistoryError, match=r"client 'client-009' did not participate in round 1"
        ):
            store.client_update(1, "client-009")
        with pytest.raises(
            HistoryError, match=r"round 4 is not in .*: committed rounds are 1\.\.1"
        ):
            store.client_update(4, "client-000")
        with pytest.raises(
            HistoryError, match=r"round 2 is not in .*: committed rounds are 1\.\.1"
        ):
            store.round(2)
        with pytest.raises(HistoryError, match=r"no global model after round 2"):
            store.global_model(2)


def test_identical_updates_share_one_blob(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        same = update(1, 0)
        store.commit_round(
            round=1,
            global_before=digest_of(encode(model(0))),
            global_after=model(1),
            participants=[participant(1, 0, update=same), participant(1, 1, update=same)],
            config={},
        )
        assert store.summary()["num_blobs"] == 3  # θ0, θ1, one update
        np.testing.assert_array_equal(store.client_update(1, "client-001")["w"], 1.0)


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize(("codec", "per_param"), [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_codec_sets_the_update_blob_size(tmp_path: Path, codec: str, per_param: int) -> None:
    # A 10,000-parameter model: the payload is per_param bytes per parameter, plus the
    # magic, the length and a JSON header of well under 200 bytes.
    big = {"w": np.linspace(-1, 1, 10_000, dtype=np.float32).reshape(100, 100)}
    with HistoryStore.create(tmp_path / codec, run_config={}, codec=codec) as store:
        theta0 = store.put_initial_model(big)
        delta = {"w": big["w"] / 3}
        record = store.commit_round(
            round=1,
            global_before=theta0,
            global_after=big,
            participants=[participant(1, 0, update=delta)],
            config={},
        )
        size = store.blob_location(record.participants[0].update_digest).nbytes
        assert per_param * 10_000 < size < per_param * 10_000 + 200
        got = store.client_update(1, "client-000")["w"]
        relative = {"fp32": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}[codec]
        assert np.all(np.abs(got - delta["w"]) <= relative * np.abs(delta["w"]) + 2.0**-25)
        # Global models stay fp32 whatever the codec.
        np.testing.assert_array_equal(store.global_model(1)["w"], big["w"])


# ---------------------------------------------------------------- damaged blobs on read


def test_reading_a_flipped_byte_update_raises_naming_file_round_and_client(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run")
    record = commit(store, 1)
    location = locate(tmp_path / "run", record.participant("client-001").update_digest)
    flip_byte(location.path, location.offset + location.nbytes - 1)  # its last byte
    with pytest.raises(IntegrityError) as info:
        store.client_update(1, "client-001")
    message = str(info.value)
    assert message.startswith(
        f"round 1, client 'client-001': blob bytes {location.offset}.."
        f"{location.offset + location.nbytes} of {location.path} is altered: "
    )
    assert message.endswith(f"expected {record.participant('client-001').update_digest}")
    np.testing.assert_array_equal(store.client_update(1, "client-000")["w"], 1.0)  # unaffected
    store.close()


def test_reading_a_damaged_global_model_raises(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run")
    record = commit(store, 1)
    location = locate(tmp_path / "run", record.global_after)
    n = len(encode(model(1)))
    assert location.path.stat().st_size == location.offset + n  # the model ends its pack
    os.truncate(location.path, location.offset + n - 3)
    with pytest.raises(
        IntegrityError,
        match=rf"round 1, global model: blob bytes {location.offset}..{location.offset + n} "
        rf"of {location.path} is truncated: {n - 3} of {n} bytes present$",
    ):
        store.global_model(1)
    os.remove(locate(tmp_path / "run", store.initial_model_digest or "").path)
    with pytest.raises(
        IntegrityError,
        match=r"initial model \(round 0\): blob bytes 0\.\.\d+ of .*\.pack is missing: the "
        r"file does not exist \(expected sha256:",
    ):
        store.global_model(0)
    store.close()


@pytest.mark.parametrize("offset", [-8, 2**62, 1 << 40])
def test_a_flipped_blob_offset_is_an_integrity_error_naming_the_file(
    tmp_path: Path, offset: int
) -> None:
    store = new_store(tmp_path / "run")
    record = commit(store, 1)
    location = locate(tmp_path / "run", record.global_after)
    store.close()
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    conn.execute("UPDATE blobs SET offset = ? WHERE digest = ?", (offset, record.global_after))
    conn.commit()
    conn.close()
    with HistoryStore.open(tmp_path / "run") as store, pytest.raises(IntegrityError) as info:
        store.global_model(1)
    message = str(info.value)
    assert message.startswith("round 1, global model: ")
    assert location.path.name in message
    assert "impossible" in message or "truncated: 0 of" in message


def test_reading_an_altered_record_raises(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        commit(store, 1)
    conn = sqlite3.connect(tmp_path / "run" / "history.sqlite")
    (record,) = conn.execute("SELECT record FROM rounds WHERE round = 1").fetchone()
    altered = record.replace(b'"learning-rate":0.1', b'"learning-rate":0.9')
    assert altered != record
    conn.execute("UPDATE rounds SET record = ? WHERE round = 1", (altered,))
    conn.commit()
    conn.close()
    with (
        HistoryStore.open(tmp_path / "run") as store,
        pytest.raises(IntegrityError, match=r"round 1: record in .*history.sqlite is altered"),
    ):
        store.round(1)


def test_blob_header_starts_with_the_magic(tmp_path: Path) -> None:
    with new_store(tmp_path / "run") as store:
        theta0 = store.initial_model_digest or ""
    location = locate(tmp_path / "run", theta0)
    assert (location.offset, location.nbytes) == (0, location.path.stat().st_size)
    assert location.path.read_bytes().startswith(MAGIC)


def test_a_round_is_one_pack_of_its_new_blobs_in_order(tmp_path: Path) -> None:
    # Round 1: client 1 replies first; round 2: client 0 sends round 1's update again
    # (already stored: not written twice).
    with new_store(tmp_path / "run") as store:
        record = store.commit_round(
            round=1, global_before=digest_of(encode(model(0))), global_after=model(1),
            participants=[participant(1, 1), participant(1, 0)], config={},
        )
        store.commit_round(
            round=2, global_before=record.global_after, global_after=model(2),
            participants=[participant(2, 0, update=update(1, 0)), participant(2, 1)],
            config={},
        )
        # client-000, client-001, the model, of each round
        locations = {
            t: [store.blob_location(p.update_digest) for p in store.round(t).participants]
            + [store.blob_location(store.model_digest(t))]
            for t in (1, 2)
        }
    # Round 1's pack: the updates in the order given, then the model, back to back.
    one = locations[1]
    assert len({loc.path for loc in one}) == 1
    assert one[0].path.read_bytes() == (
        encode(update(1, 1)) + encode(update(1, 0)) + encode(model(1))
    )
    n = len(encode(update(1, 1)))
    assert [(loc.offset, loc.nbytes) for loc in one] == [
        (n, n), (0, n), (2 * n, len(encode(model(1))))
    ]
    # Round 2's pack holds only what was new: client 1's update and the model.
    two = locations[2]
    assert two[0] == one[0]
    assert two[1].path == two[2].path != one[0].path
    assert two[1].path.read_bytes() == encode(update(2, 1)) + encode(model(2))
    assert len(packs(tmp_path / "run")) == 3


def test_a_commit_fsyncs_one_pack_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(tmp_path / "run")
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc") else "?")
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", counting_fsync)
    commit(store, 1, clients=(0, 1, 2, 3))
    monkeypatch.undo()
    store.close()
    if os.path.exists("/proc"):
        (pack,) = [p for p in packs(tmp_path / "run") if p.name.startswith("000001-")]
        assert synced == [str(pack), str(tmp_path / "run" / "blobs")]
    else:  # pragma: no cover - not Linux
        assert len(synced) == 2


def test_fork_keeps_rounds_up_to_a_round_and_shares_their_packs(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run")
    for t in (1, 2, 3):
        commit(store, t)
    fork = store.fork(tmp_path / "fork", upto_round=2)
    with fork:
        assert fork.last_round == 2
        assert [r.round for r in fork.rounds()] == [1, 2]
        assert fork.summary()["num_blobs"] == 7  # θ0..θ2, 2 updates in rounds 1 and 2
        np.testing.assert_array_equal(fork.global_model(2)["w"], model(2)["w"])
        np.testing.assert_array_equal(fork.client_update(2, "client-001")["w"], 2.125)
        for p in packs(tmp_path / "fork"):  # hard links to the original packs
            assert os.path.samefile(p, tmp_path / "run" / "blobs" / p.name)
        commit(fork, 3, clients=(0,))  # a different round 3 goes to the fork only
        assert fork.round(3).client_ids == ("client-000",)
    assert store.round(3).client_ids == ("client-000", "client-001")
    store.close()
    assert verify_store(tmp_path / "run").ok
    assert verify_store(tmp_path / "fork").ok


# ---------------------------------------------------------------- crash safety

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fedforget.history import HistoryStore, ParticipantUpdate

    directory, fsync = sys.argv[1], sys.argv[2] == "1"

    def model(t):
        return {"w": np.full((128, 128), t, np.float32), "b": np.full(128, -t, np.float32)}

    def update(t, k):
        return {"w": np.full((128, 128), t + k / 8, np.float32), "b": np.zeros(128, np.float32)}

    store = HistoryStore.create(directory, run_config={}, retain_interval=2, fsync=fsync)
    before = store.put_initial_model(model(0))
    t = 0
    while True:
        t += 1
        record = store.commit_round(
            round=t,
            global_before=before,
            global_after=model(t),
            participants=[
                ParticipantUpdate(f"client-{k}", 10, 0.25, t, update(t, k)) for k in range(4)
            ],
            config={"round": t},
        )
        before = record.global_after
        print(t, flush=True)
    """
)


def _expected_model(t: int) -> dict[str, np.ndarray]:
    return {"w": np.full((128, 128), t, np.float32), "b": np.full(128, -t, np.float32)}


@pytest.mark.parametrize(
    ("seen", "delay", "fsync"),
    [(1, 0.0, True), (2, 0.002, True), (3, 0.005, True), (4, 0.0005, True), (2, 0.001, False)],
)
def test_sigkill_mid_run_leaves_the_last_committed_round(
    tmp_path: Path, seen: int, delay: float, fsync: bool
) -> None:
    # Prepare: a child commits rounds in a loop and prints each committed round.
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    run = tmp_path / "run"
    with subprocess.Popen(
        [sys.executable, str(script), str(run), "1" if fsync else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        # Execute: wait until `seen` rounds are reported, then kill it at once or a little
        # later, in the middle of a later commit.
        assert child.stdout is not None and child.stderr is not None
        try:
            for _ in range(seen):
                line = child.stdout.readline()
                assert line, child.stderr.read()
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    # Assert: the store is whole, at a round >= the last one the child reported.
    report = verify_store(run)
    assert report.ok, report.problems
    with HistoryStore.open(run) as store:
        last = store.last_round
        assert last >= seen
        assert report.rounds_checked == last
        np.testing.assert_array_equal(store.global_model(last)["w"], _expected_model(last)["w"])
        # The run can go on from there (an orphan pack of the killed round is ignored).
        store.commit_round(
            round=last + 1,
            global_before=store.round(last).global_after,
            global_after=_expected_model(last + 1),
            participants=[],
            config={},
        )
    assert verify_store(run).ok

"""Tree heads are signed on the store's writer thread, in round order, and a signing that
fails fails the run with the store's clear error."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import small_config

from fedforget.engine import run_training
from fedforget.fileio import StorageError
from fedforget.history import HeadLog, HistoryStore, verify_store
from fedforget.history.commitment import read_head_log
from fedforget.history.records import RoundRecord


def test_heads_are_signed_on_the_writer_thread_in_round_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, str]] = []
    original = HeadLog.on_commit

    def watching(self: HeadLog, record: RoundRecord) -> None:
        seen.append((record.round, threading.current_thread().name))
        original(self, record)

    monkeypatch.setattr(HeadLog, "on_commit", watching)
    run_training(small_config(**{"num-rounds": 4}), out=tmp_path / "run", engine="inprocess",
                 progress=False)
    assert [t for t, _ in seen] == [1, 2, 3, 4]
    assert all(name.startswith("fedforget-history") for _, name in seen), seen
    heads = [h.head for h in read_head_log(tmp_path / "run" / "tree_heads.jsonl")[0]]
    with HistoryStore.open(tmp_path / "run") as store:
        assert heads[-1].size == store.last_round == 4


def test_a_failed_signing_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: HeadLog, record: RoundRecord) -> None:
        if record.round == 2:
            raise StorageError("cannot append a signed tree head to tree_heads.jsonl (test)")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(HeadLog, "on_commit", failing)
        with pytest.raises(StorageError, match="signed tree head"):
            run_training(small_config(**{"num-rounds": 4}), out=run, engine="inprocess",
                         progress=False)
    with HistoryStore.open(run) as store:
        assert 2 <= store.last_round <= 3  # stopped at the next round, not at the end
    # nothing is lost: the same command resumes, signs what is not yet covered, and ends
    # with the model of an uninterrupted run
    run_training(small_config(**{"num-rounds": 4}), out=run, engine="inprocess",
                 progress=False)
    run_training(small_config(**{"num-rounds": 4}), out=tmp_path / "whole",
                 engine="inprocess", progress=False)
    assert verify_store(run).ok
    with HistoryStore.open(run) as store, HistoryStore.open(tmp_path / "whole") as whole:
        assert store.last_round == 4
        assert store.model_digest(4) == whole.model_digest(4)

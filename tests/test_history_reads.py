"""Read paths added for scale: per-client rounds from the index, record bytes unparsed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from history_builders import build_store, tensors

from fedforget.errors import IntegrityError

ROUNDS = [
    {"a": (1, {"w": [1, 0], "b": [[0, 0]]}), "u": (1, {"w": [0, 1], "b": [[1, 0]]})},
    {"a": (2, {"w": [1, 1], "b": [[0, 1]]})},
    {"u": (3, {"w": [2, 0], "b": [[0, 2]]}), "b": (1, {"w": [0, 0], "b": [[1, 1]]})},
]


def test_client_rounds_and_the_roster(tmp_path: Path) -> None:
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), ROUNDS) as store:
        assert store.client_rounds("u") == [1, 3]
        assert store.client_rounds("a") == [1, 2]
        assert store.client_rounds("nobody") == []
        assert store.roster() == ("a", "b", "u")
        assert {c: store.client_rounds(c) for c in "abu"} == store.clients()
    # a roster recorded before round 1 keeps a client that never took part
    with build_store(tmp_path / "run2", tensors([0, 0], [[0, 0]]), ROUNDS,
                     roster=["a", "b", "u", "z"]) as store:
        assert store.roster() == ("a", "b", "u", "z")
        assert store.client_rounds("z") == []


def test_record_bytes_are_the_records_canonical_bytes(tmp_path: Path) -> None:
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), ROUNDS) as store:
        assert list(store.record_bytes()) == [r.canonical_bytes() for r in store.rounds()]
        packs = sum(p.stat().st_size for p in (tmp_path / "run" / "blobs").iterdir())
        assert store.bytes_stored() == store.summary()["bytes_stored"] == packs


def test_an_altered_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run"
    build_store(path, tensors([0, 0], [[0, 0]]), ROUNDS).close()
    with sqlite3.connect(path / "history.sqlite") as db:
        (record,) = db.execute("SELECT record FROM rounds WHERE round = 2").fetchone()
        db.execute("UPDATE rounds SET record = ? WHERE round = 2",
                   (record.replace(b'"a"', b'"x"'),))
    from fedforget.history import HistoryStore

    with HistoryStore.open(path) as store, pytest.raises(
            IntegrityError, match="round 2: record in .* is altered: its SHA-256 is"):
        list(store.record_bytes())

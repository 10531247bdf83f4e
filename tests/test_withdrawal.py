"""Withdrawal requests: persistence, the state machine, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedforget.history import HistoryStore
from fedforget.withdrawal import WithdrawalError, WithdrawalLedger

ROSTER = frozenset({"client-000", "client-001"})


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    HistoryStore.create(tmp_path / "run", run_config={"seed": 0}).close()
    return tmp_path / "run"


def test_a_request_is_persisted_with_who_when_why(run_dir: Path) -> None:
    with WithdrawalLedger(run_dir) as ledger:
        request, created = ledger.request("client-001", reason="moving", roster=ROSTER)
    assert created
    with WithdrawalLedger(run_dir) as reopened:
        again = reopened.get(request.request_id)
    assert (again.client_id, again.reason, again.state) == ("client-001", "moving", "pending")
    assert again.received_at.endswith("Z")


def test_withdrawing_twice_returns_the_existing_request(run_dir: Path) -> None:
    with WithdrawalLedger(run_dir) as ledger:
        first, _ = ledger.request("client-001", reason="a", roster=ROSTER)
        second, created = ledger.request("client-001", reason="b", roster=ROSTER)
        assert not created
        assert second == first
        assert len(ledger.all()) == 1


def test_an_unknown_client_is_refused_by_name(run_dir: Path) -> None:
    with WithdrawalLedger(run_dir) as ledger, pytest.raises(
        WithdrawalError, match=r"unknown client 'client-042': this run's clients are "
                               r"client-000, client-001"
    ):
        ledger.request("client-042", reason="", roster=ROSTER)


def test_an_unknown_client_of_a_large_run_is_refused_in_one_readable_line(run_dir: Path
                                                                         ) -> None:
    # 10,000 clients: the message names their number, the first and the last, and the ids
    # closest to the one asked (here a digit too many), not all 10,000.
    roster = frozenset(f"client-{i:03d}" for i in range(10_000))
    with WithdrawalLedger(run_dir) as ledger, pytest.raises(WithdrawalError) as caught:
        ledger.request("client-00042", reason="", roster=roster)
    message = str(caught.value)
    assert message.startswith("unknown client 'client-00042': this run has 10000 clients, "
                              "client-000 to client-9999 in sorted order; the closest ids are ")
    assert message.split("closest ids are ")[1].split(", ")[0] == "client-042"
    assert len(message) < 200
    # Nothing close: no list of guesses.
    with WithdrawalLedger(run_dir) as ledger, pytest.raises(WithdrawalError) as caught:
        ledger.request("zz", reason="", roster=roster)
    assert str(caught.value) == ("unknown client 'zz': this run has 10000 clients, "
                                 "client-000 to client-9999 in sorted order")


def test_states_move_only_along_the_machine(run_dir: Path) -> None:
    with WithdrawalLedger(run_dir) as ledger:
        request, _ = ledger.request("client-000", reason="", roster=ROSTER)
        with pytest.raises(WithdrawalError, match="is 'pending'; it cannot move to 'done'"):
            ledger.move(request.request_id, "done")
        ledger.move(request.request_id, "unlearning", method="rollback")
        failed = ledger.move(request.request_id, "failed", detail={"error": "boom"})
        assert failed.detail == {"error": "boom"} and failed.method == "rollback"
        ledger.move(request.request_id, "unlearning")
        done = ledger.move(request.request_id, "done")
        assert done.state == "done"


def test_a_request_left_unlearning_by_a_crash_is_found_again(run_dir: Path) -> None:
    with WithdrawalLedger(run_dir) as ledger:
        request, _ = ledger.request("client-000", reason="", roster=ROSTER)
        ledger.move(request.request_id, "unlearning", method="federaser")
    # (the process dies here)
    with WithdrawalLedger(run_dir) as after_restart:
        assert [r.request_id for r in after_restart.interrupted()] == [request.request_id]
        assert after_restart.withdrawn() == {"client-000"}


def test_a_directory_without_a_store_is_refused(tmp_path: Path) -> None:
    from fedforget.errors import HistoryError

    with pytest.raises(HistoryError, match="is not a run directory"):
        WithdrawalLedger(tmp_path)


def test_an_index_without_the_ledger_tables_is_refused_and_left_as_it_was(
        tmp_path: Path) -> None:
    # Prepare: a SQLite file named like the index, but not a fedforget history
    import sqlite3

    from fedforget.errors import HistoryError
    from fedforget.history.store import INDEX_FILENAME

    index = tmp_path / INDEX_FILENAME
    with sqlite3.connect(index) as db:
        db.execute("CREATE TABLE other (x INTEGER)")
    before = index.read_bytes()
    # Execute / Assert: refused by name; no table created behind the store's back
    with pytest.raises(HistoryError, match="no withdrawals or erasures table"):
        WithdrawalLedger(tmp_path)
    assert index.read_bytes() == before

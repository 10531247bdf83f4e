"""Record-level erasure requests: exactness, the client's exclusion, the record commitment.

The exactness claim is checked against a run that never had the records: a second training
run whose client keeps the ids in its own state from round 1 (its state directory pointed
elsewhere, as a SuperNode's ``state-dir`` would be). Nothing of the unlearning code runs in
that second run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config, train_small

from fedforget.cli import main
from fedforget.erasure import (
    ErasureError,
    add_client_records,
    client_records,
    parse_record_ids,
    read_record_file,
    without,
)
from fedforget.history import HistoryStore
from fedforget.receipts import load_public_key
from fedforget.receipts.records import (
    RecordCommitmentError,
    RecordOpening,
    commit_records,
    open_record,
    verify_record_opening,
)
from fedforget.receipts.verify import verify_receipt
from fedforget.task import load_client_data
from fedforget.tensors import decode, tensors_digest
from fedforget.withdrawal import WithdrawalError, WithdrawalLedger

CLIENT = "client-002"


def _ids(count: int, start: int = 0) -> list[str]:
    train, _ = load_client_data(small_config(), 2)
    return train.record_ids()[start:start + count]


def _unlearn_records(run: Path, ids: list[str], method: str, tmp: Path,
                     capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    path = tmp / f"ids-{method}.txt"
    path.write_text("# records to forget\n" + "\n".join(ids) + "\n\n")
    capsys.readouterr()
    assert main(["unlearn", str(run), "--client", CLIENT, "--records", str(path),
                 "--method", method, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def _digest(path: str | Path) -> str:
    return tensors_digest(decode(Path(path).read_bytes()))


@pytest.fixture
def never_had_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Train a run in which CLIENT never had the records ``ids``: its state directory
    (outside the run) lists them before the first round."""
    import clients.app as client_app

    def train(ids: list[str]) -> str:
        state = tmp_path / "elsewhere"
        add_client_records(state / CLIENT, "from-the-start", ids)
        with monkeypatch.context() as patch:
            patch.setattr(client_app, "state_dir_of",
                          lambda ctx: state / client_app.client_id_of(ctx))
            train_small(tmp_path / "never")
        with HistoryStore.open(tmp_path / "never") as store:
            return store.model_digest(store.last_round)

    return train


def test_record_rollback_is_bit_identical_to_a_run_without_those_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], never_had_them  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a trained run, and the digest of the run that never had 7 of client-002's
    # records.
    run = tmp_path / "run"
    train_small(run)
    ids = _ids(7, start=3)
    expected = never_had_them(ids)
    # Execute
    rolled = _unlearn_records(run, ids, "rollback", tmp_path, capsys)
    # Assert: rollback's model and the retrained reference both equal that run's model.
    assert _digest(rolled["model_path"]) == expected
    assert rolled["reference"]["model_digest"] == expected
    assert rolled["kind"] == "records"
    assert rolled["forgotten"] == []  # no whole client is forgotten
    assert rolled["scope"]["records"] == {CLIENT: 7}
    # the client stays: it answered the identify message and trained in the replay
    with HistoryStore.open(Path(rolled["history_dir"] if Path(rolled["history_dir"])
                                .is_absolute() else run / rolled["history_dir"])) as replay:
        assert CLIENT in replay.clients()
        assert all(CLIENT in replay.round(t).client_ids for t in replay.clients()[CLIENT])
    # and the original model is not the one without the records
    with HistoryStore.open(run) as store:
        assert store.model_digest(store.last_round) != expected


def test_a_record_request_keeps_the_client_in_the_federation(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2})
    ids = _ids(4)
    _unlearn_records(run, ids, "rollback", tmp_path, capsys)
    with WithdrawalLedger(run) as ledger:
        assert ledger.withdrawn() == frozenset()
        (request,) = ledger.erasures()
        assert (request.kind, request.client_id, request.state) == ("records", CLIENT, "done")
        assert ledger.scope().records == {CLIENT: frozenset(ids)}
    # the client's own state lists the ids; from now on it trains without them
    assert client_records(run / "client-state" / CLIENT) == frozenset(ids)
    train_small(run, **{"num-rounds": 3})  # the run goes on
    with HistoryStore.open(run) as store:
        record = store.round(3)
    n = {p.client_id: p.num_examples for p in record.participants}
    assert CLIENT in n
    train, _ = load_client_data(small_config(), 2)
    assert n[CLIENT] == len(train) - len(ids)


def test_a_record_receipt_verifies_and_opens_for_a_named_record_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2})
    ids = _ids(5)
    result = _unlearn_records(run, ids, "rollback", tmp_path, capsys)
    receipt = result["receipt"]
    state = run / "client-state" / CLIENT / "receipts"  # as delivered to the client
    salt = bytes.fromhex((state / f"{receipt['receipt_id']}.records-salt").read_text().strip())
    envelope = (run / receipt["receipt_path"]).read_bytes()
    key = load_public_key(receipt["public_key_path"])
    # Execute: the client opens its commitment for one named record.
    opening = open_record(salt, ids, ids[2])
    verified = verify_receipt(envelope, public_key=key,
                              model_bytes=Path(result["model_path"]).read_bytes(),
                              record_opening=opening)
    # Assert: the receipt verifies and says it covers that record; nothing else opens.
    assert f"record {ids[2]} covered" in verified.checks
    assert verified.statement.scope["kind"] == "records"
    assert verified.statement.scope["records"]["count"] == 5
    other = _ids(1, start=20)[0]  # a record of the client that the request did not name
    with pytest.raises(RecordCommitmentError, match="not among the 5 committed records"):
        open_record(salt, ids, other)
    forged = RecordOpening(record_id=other, record_salt=opening.record_salt,
                           index=opening.index, size=opening.size, proof=opening.proof)
    with pytest.raises(RecordCommitmentError, match=f"record '{other}' does not open"):
        verify_receipt(envelope, public_key=key, record_opening=forged)
    # the receipt names no record id in clear
    payload = json.dumps(verified.predicate)
    assert not any(f'"{i}"' in payload for i in ids)


def test_the_receipt_cli_opens_and_checks_a_record(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2})
    ids = _ids(3)
    result = _unlearn_records(run, ids, "retrain", tmp_path, capsys)
    receipt = result["receipt"]
    state = run / "client-state" / CLIENT / "receipts"  # as delivered to the client
    rid = receipt["receipt_id"]
    capsys.readouterr()
    assert main(["receipt", "open-record", "--records-salt", str(state / f"{rid}.records-salt"),
                 "--records", str(state / f"{rid}.records"), "--record", ids[1]]) == 0
    opening = tmp_path / "opening.json"
    opening.write_text(capsys.readouterr().out)
    assert main(["receipt", "verify", str(run / receipt["receipt_path"]), "--key",
                 receipt["public_key_path"], "--record-opening", str(opening)]) == 0
    assert f"record {ids[1]} covered" in capsys.readouterr().out
    assert main(["receipt", "open-record", "--records-salt", str(state / f"{rid}.records-salt"),
                 "--records", str(state / f"{rid}.records"), "--record", "99999"]) == 1


def test_record_requests_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2})
    holdout_id = load_client_data(small_config(), 2)[1].record_ids()[0]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{holdout_id}\n")
    assert main(["unlearn", str(run), "--client", CLIENT, "--records", str(bad),
                 "--method", "rollback"]) == 2
    assert f"record {holdout_id} is not one of {CLIENT}'s training records" in \
        capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text("\n".join(_ids(2)) + "\n")
    assert main(["unlearn", str(run), "--client", CLIENT, "--records", str(good),
                 "--method", "federaser"]) == 2
    assert "federaser serves client requests, not records requests" in capsys.readouterr().err
    with WithdrawalLedger(run) as ledger:
        assert ledger.all() == []
    assert not (run / "client-state" / CLIENT / "forgotten-records.json").exists()


# ------------------------------------------------------------------- unit level
def test_without_drops_named_records_and_labels_and_keeps_the_order() -> None:
    from fedforget.data import ArrayDataset

    data = ArrayDataset(x=np.arange(12, dtype=np.float32).reshape(6, 2),
                        y=np.array([0, 1, 2, 0, 1, 2]), num_classes=3, name="d",
                        ids=np.array([10, 11, 12, 13, 14, 15]))
    kept = without(data, records={"11", "15"}, labels={0})
    assert kept.ids.tolist() == [12, 14]
    assert kept.y.tolist() == [2, 1]
    assert without(data) is data
    with pytest.raises(ErasureError, match="has no record ids"):
        without(ArrayDataset(x=data.x, y=data.y, num_classes=3, name="plain"), records={"1"})


def test_record_ids_are_parsed_strictly(tmp_path: Path) -> None:
    assert parse_record_ids(["12", " 3", 12]) == ["3", "12"]
    with pytest.raises(ErasureError, match="'x1' is not a record id"):
        parse_record_ids(["x1"])
    path = tmp_path / "ids"
    path.write_text("# none\n\n")
    with pytest.raises(ErasureError, match="no record id given"):
        read_record_file(path)


def test_record_ids_are_stable_across_runs_and_seeds() -> None:
    # The same example keeps its id whatever the split: compare features through the ids.
    from fedforget.data import load_dataset

    a, _ = load_dataset("digits", seed=0)
    b, _ = load_dataset("digits", seed=1)
    common = np.intersect1d(a.ids, b.ids)
    ia = {int(i): k for k, i in enumerate(a.ids)}
    ib = {int(i): k for k, i in enumerate(b.ids)}
    for rid in common[:50]:
        assert np.array_equal(a.x[ia[int(rid)]], b.x[ib[int(rid)]])


def test_a_withdrawn_client_cannot_ask_for_its_records(tmp_path: Path) -> None:
    HistoryStore.create(tmp_path / "r", run_config={"seed": 0}).close()
    with WithdrawalLedger(tmp_path / "r") as ledger:
        ledger.request(CLIENT, reason="leaving", roster={CLIENT})
        with pytest.raises(WithdrawalError, match="has withdrawn"):
            ledger.request_records(CLIENT, ["1"], reason="", roster={CLIENT})


def test_the_record_commitment_depends_on_the_salt_and_on_every_id() -> None:
    salt = bytes(range(32))
    ids = ["4", "8", "15", "16", "23"]
    root = commit_records(salt, ids)
    assert root.count == 5
    assert commit_records(salt, list(reversed(ids))) == root  # order does not matter
    assert commit_records(bytes(32), ids).root != root.root
    assert commit_records(salt, ids[:-1] + ["42"]).root != root.root
    for rid in ids:
        verify_record_opening(open_record(salt, ids, rid), root, record_id=rid)
    with pytest.raises(RecordCommitmentError, match="expected '8'"):
        verify_record_opening(open_record(salt, ids, "4"), root, record_id="8")


# ------------------------------------------------------------- predicate scope
def _receipt_with_scope(scope: object) -> bytes:
    from test_receipts_receipt import KEY, make_receipt

    return make_receipt(KEY, scope=scope)


def test_a_scope_in_the_predicate_is_checked_and_fails_closed() -> None:
    from test_receipts_receipt import KEY

    from fedforget.receipts.errors import PredicateError

    salt = bytes(range(32))
    good = {"kind": "records", "records": commit_records(salt, ["1", "2"]).to_dict()}
    verified = verify_receipt(_receipt_with_scope(good), public_key=KEY.public_key(),
                              record_opening=open_record(salt, ["1", "2"], "2"))
    assert verified.statement.scope["records"]["count"] == 2
    for bad, message in [
        ({"kind": "rows", "labels": [1]}, "scope.kind is 'rows'"),
        ({"kind": "class", "labels": []}, "expected a list of labels"),
        ({"kind": "class", "labels": [3, 1]}, "expected increasing labels"),
        ({"kind": "class", "labels": [1], "extra": 0}, "unknown field 'extra'"),
        ({"kind": "records", "records": {"count": 0, "root": "0" * 64, "scheme": "x"}},
         "count is 0"),
    ]:
        with pytest.raises(PredicateError, match=message):
            _receipt_with_scope(bad)
    # a whole-client receipt has no scope, and no record opens it
    plain = _receipt_with_scope(None)
    assert verify_receipt(plain, public_key=KEY.public_key()).statement.scope is None
    with pytest.raises(RecordCommitmentError, match="commits to no records"):
        verify_receipt(plain, public_key=KEY.public_key(),
                       record_opening=open_record(salt, ["1"], "1"))

"""Class-level erasure requests: every client leaves out a label, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_config, train_small

from fedforget.cli import main
from fedforget.erasure import labels_of
from fedforget.history import HistoryStore
from fedforget.receipts import load_public_key
from fedforget.receipts.verify import verify_receipt
from fedforget.rundir import RunDirectory
from fedforget.task import load_client_data
from fedforget.tensors import decode, tensors_digest
from fedforget.withdrawal import WithdrawalLedger


def _forget_class(run: Path, label: int, method: str,
                  capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert main(["unlearn", str(run), "--forget-class", str(label), "--method", method,
                 "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def _digest(path: str | Path) -> str:
    return tensors_digest(decode(Path(path).read_bytes()))


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("class") / "run"
    train_small(run, **{"num-rounds": 4, "local-epochs": 2})
    return run


def test_class_retrain_has_about_zero_accuracy_on_the_class(
    class_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _forget_class(class_run, 1, "retrain", capsys)
    m = result["metrics"]
    # A model that never saw label 1 never predicts it.
    assert m["forgotten_class_accuracy"]["unlearned"] <= 0.02
    assert m["forgotten_class_accuracy"]["original"] >= 0.5  # it was learnt before
    assert m["retained_class_accuracy"]["unlearned"] >= 0.5
    assert result["kind"] == "class"
    assert result["scope"]["labels"] == [1]
    # every replayed round told the clients to leave label 1 out (the audit trail)
    key = sorted(set(result["forgotten"]) | set(result["scope"]["tokens"]))
    assert key == ["class:1"]
    history = RunDirectory(class_run).reference_dir(key) / "history"
    with HistoryStore.open(history) as replay:
        for t in range(1, replay.last_round + 1):
            assert labels_of(replay.round(t).config) == frozenset({1})
            train = {p.client_id: p.num_examples for p in replay.round(t).participants}
            for cid, n in train.items():
                data, _ = load_client_data(small_config(), int(cid.rsplit("-", 1)[1]))
                assert n == int((data.y != 1).sum())


def test_class_rollback_replays_from_round_one_and_equals_retrain(
    class_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rolled = _forget_class(class_run, 1, "rollback", capsys)
    assert rolled["rounds_affected"] == [1, 2, 3, 4]
    assert _digest(class_run / rolled["model_path"]) == rolled["reference"]["model_digest"]
    assert rolled["reference"]["bit_identical"] is True


def test_a_class_receipt_names_the_label_and_every_round(
    class_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _forget_class(class_run, 2, "retrain", capsys)
    receipt = result["receipt"]
    verified = verify_receipt((class_run / receipt["receipt_path"]).read_bytes(),
                              public_key=load_public_key(receipt["public_key_path"]))
    # the receipt covers this request's label; earlier class requests stay in force
    assert dict(verified.statement.scope) == {"kind": "class", "labels": [2]}
    assert verified.statement.rounds_affected == (1, 2, 3, 4)
    metrics = verified.statement.comparison.metrics  # type: ignore[union-attr]
    assert "forgotten-class-accuracy-unlearned" in metrics
    with WithdrawalLedger(class_run) as ledger:
        assert {r.client_id for r in ledger.erasures()} == {"operator"}
        in_force = ledger.scope().labels
    assert 2 in in_force
    assert result["scope"]["labels"] == sorted(in_force)


def test_a_class_request_is_refused_for_a_whole_client_method_or_a_bad_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2})
    assert main(["unlearn", str(run), "--forget-class", "1", "--method", "subtract"]) == 2
    assert "subtract serves client requests, not class requests" in capsys.readouterr().err
    assert main(["unlearn", str(run), "--forget-class", "7", "--method", "retrain"]) == 2
    assert "label 7 is not a class of this task; expected 0..3" in capsys.readouterr().err
    with WithdrawalLedger(run) as ledger:
        assert ledger.all() == []


def test_training_resumed_after_a_class_request_leaves_the_class_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 2})
    _forget_class(run, 0, "rollback", capsys)
    train_small(run, **{"num-rounds": 3})  # the run goes on
    with HistoryStore.open(run) as store:
        assert labels_of(store.round(2).config) == frozenset()  # before the request
        assert labels_of(store.round(3).config) == frozenset({0})
        for p in store.round(3).participants:
            data, _ = load_client_data(small_config(), int(p.client_id.rsplit("-", 1)[1]))
            assert p.num_examples == int((data.y != 0).sum())

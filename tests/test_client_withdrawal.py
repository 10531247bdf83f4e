"""A client asks to leave from its own node; withdrawals recorded while training runs take
effect from the next round (in-process engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_config_for, small_config, train_small
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedforget.cli import main
from fedforget.engine import run_training
from fedforget.engine.apps import find_project
from fedforget.engine.inprocess import run_inprocess
from fedforget.history import HistoryStore
from fedforget.rundir import RunDirectory
from fedforget.withdrawal import WithdrawalLedger


def test_a_client_asks_itself_and_gets_its_receipt_in_its_state_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: 2 rounds; then client-002's operator asks, on its own state directory
    run = RunDirectory(tmp_path / "run")
    train_small(run.path, **{"num-rounds": 2})
    state = run.client_state("client-002")
    assert main(["client", "withdraw", "--state-dir", str(state), "--reason", "we close"]) == 0
    # Execute: the next run (2 more rounds) with the server's policy: rollback
    run_training(small_config(**{"num-rounds": 4}), out=run.path, progress=False,
                 withdrawal_method="rollback")
    # Assert: recorded, bound to its node, never selected again, served, receipt delivered
    with HistoryStore.open(run.path) as store:
        assert store.clients()["client-002"] == [1, 2]
    with WithdrawalLedger(run.path) as ledger:
        request = ledger.for_client("client-002")
    assert request is not None and request.state == "done" and request.reason == "we close"
    asked = json.loads(run.asked(request.request_id).read_text())
    assert isinstance(asked["node_id"], int) and asked["client_id"] == "client-002"
    status = json.loads((state / "withdrawal.json").read_text())
    assert status["state"] == "receipted" and status["request_id"] == request.request_id
    receipt = state / "receipts" / f"{status['receipt_id']}.json"
    model = run.result_dir(request.request_id, "rollback") / "model.fft"
    capsys.readouterr()
    code = (main(["receipt", "verify", str(receipt), "--key", str(state / "server.pub"),
                 "--model", str(model), "--head", str(state / "head.json"),
                 "--salt", (state / "receipts" / f"{status['receipt_id']}.salt").read_text()
                 .strip(), "--client", "client-002"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "consistency proof from size 2" in out  # the head the client saved after round 2
    assert not list(run.outbox(request.request_id).glob("*.salt"))


def test_a_withdrawal_recorded_while_training_runs_takes_effect_from_the_next_round(
        tmp_path: Path) -> None:
    # Prepare: a ClientApp that, while client-000 trains round 2, records the withdrawal of
    # client-003 in the ledger (as an operator's `fedforget withdraw` would, concurrently)
    out = tmp_path / "run"
    server_app, client_app = find_project().load()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if (context.node_config["partition-id"] == 0
                and msg.content["config"].get("server-round") == 2):
            with WithdrawalLedger(out) as ledger:
                ledger.request("client-003", reason="by the operator", roster={"client-003"})
        return client_app(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_app(msg, context)

    # Execute
    run_inprocess(server_app, app, num_nodes=4,
                  run_config=run_config_for(small_config(**{"num-rounds": 4}), out))
    # Assert: it trained rounds 1-2 (the round 2 message was already sent), not 3-4
    with HistoryStore.open(out) as store:
        assert store.clients()["client-003"] == [1, 2]
        assert store.clients()["client-000"] == [1, 2, 3, 4]

"""A client withdraws itself from a real deployment and verifies its receipt on its node.

One ``flower-superlink`` with TLS and SuperNode authentication and three real SuperNodes on
loopback (certificates and keys made here; every process stopped by its PID at the end):
train; client-002's operator asks to leave on its own node (``fedforget client withdraw
--state-dir``); at the node's next contact the server records it, bound to that node's
authenticated node id, serves it by its policy with ``rollback`` on the SuperNodes and
delivers the receipt and salt to that node, which verifies the receipt with the head it
saved itself; then ``federaser`` serves the same request on the SuperNodes. Rollback's
model is the in-process retrain's, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import small_config

from fedforget.cli import main
from fedforget.engine import declared_run_config, run_training, run_unlearning
from fedforget.engine.apps import find_project
from fedforget.engine.deployment import LocalDeployment
from fedforget.history import HistoryStore
from fedforget.results import UnlearningOutcome
from fedforget.rundir import RESULT_FILE, RunDirectory
from fedforget.service import order_unlearning
from fedforget.settings import RunSettings
from fedforget.withdrawal import WithdrawalLedger

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

LEAVING = 2  # client-002 asks to leave (and consents to figures on its own data)


def _config() -> Any:
    return small_config(**{"num-clients": 3, "num-rounds": 3})


def _run_config(out: Path, **settings: Any) -> dict[str, Any]:
    run = RunSettings(out_dir=str(out), progress=False, engine="deployment", node_auth=True,
                      **settings)
    return declared_run_config(find_project(),
                               {**_config().to_mapping(), **run.to_run_config()})


def test_a_client_withdraws_itself_is_unlearned_on_the_supernodes_and_verifies_its_receipt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDirectory(tmp_path / "run")
    with LocalDeployment(tmp_path / "federation", num_nodes=0) as federation:
        nodes = [federation.add_node(
            {"partition-id": i, "num-partitions": 3,
             **({"fedforget-consent": True} if i == LEAVING else {})}, name=f"node-{i}")
            for i in range(3)]
        state = nodes[LEAVING].state_dir
        # Prepare: 3 rounds on the SuperNodes
        federation.run(_run_config(run.path))
        with HistoryStore.open(run.path) as store:
            assert store.last_round == 3
            trained = store.model_digest(3)
        # each client id is pinned to the node id its registered key got
        pins = json.loads(run.nodes.read_text())["pins"]
        assert pins == {f"client-00{i}": nodes[i].node_id for i in range(3)}
        # Execute: client-002's operator asks on its own node ...
        assert main(["client", "withdraw", "--state-dir", str(state),
                     "--reason", "we close"]) == 0
        # ... and the next contact (the same training command, with the server's policy)
        federation.run(_run_config(run.path, withdrawal_method="rollback"))
        with WithdrawalLedger(run.path) as ledger:
            request = ledger.for_client("client-002")
        assert request is not None and request.state == "done"
        asked = json.loads(run.asked(request.request_id).read_text())
        assert asked["node_id"] == nodes[LEAVING].node_id  # bound to its authenticated key
        rollback = UnlearningOutcome.read(run.result_dir(request.request_id, "rollback")
                                          / RESULT_FILE)
        # the receipt and salt were delivered to the node, which verifies them offline,
        # with the head it saved itself (before any later run shows it a newer one)
        status = json.loads((state / "withdrawal.json").read_text())
        assert status["state"] == "receipted" and status["request_id"] == request.request_id
        receipt = state / "receipts" / f"{status['receipt_id']}.json"
        salt = (state / "receipts" / f"{status['receipt_id']}.salt").read_text().strip()
        capsys.readouterr()
        code = main(["receipt", "verify", str(receipt), "--key", str(state / "server.pub"),
                     "--model", str(run.path / rollback.model_path),
                     "--head", str(state / "head.json"), "--salt", salt,
                     "--client", "client-002"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "consistency proof from size 3" in out  # the head the node saved after round 3
        assert not list(run.outbox(request.request_id).glob("*.salt"))
        # then federaser on the same request, on the SuperNodes too
        order_unlearning(run, client="client-002", method="federaser",
                         params={"retain-interval": 1, "calibration-ratio": 0.5})
        federation.run(_run_config(run.path, mode="unlearn", request_id=request.request_id))
        federaser = UnlearningOutcome.read(run.result_dir(request.request_id, "federaser")
                                           / RESULT_FILE)
    # Assert: both served on the deployment, with the clients' work
    for outcome in (rollback, federaser):
        assert outcome.engine == "deployment" and outcome.forgotten == ["client-002"]
        assert outcome.original_model_digest == trained
        # figures on client-002's data came from its node (it consented)
        assert outcome.metrics["forgotten_figures"]["answered"] == ["client-002"]
        assert set(outcome.metrics["forgotten_accuracy"]) == {"original", "unlearned",
                                                              "retrained"}
        assert outcome.metrics["shadow_attack"] is None  # needs its data on the server
    assert federaser.cost.client_epochs > 0 and federaser.cost.client_seconds > 0
    assert rollback.reference.bit_identical  # the deployed retrain's model
    # Rollback on the SuperNodes = the in-process engine's retrain, bit for bit
    reference = tmp_path / "inprocess"
    run_training(_config(), out=reference, engine="inprocess", progress=False)
    with HistoryStore.open(reference) as store:
        assert store.model_digest(3) == trained
    retrain = run_unlearning(reference, client="client-002", method="retrain",
                             progress=False)
    assert retrain is not None and retrain.model_digest == rollback.model_digest

"""A client withdraws itself from a real deployment and verifies its receipt on its node.

One ``flower-superlink`` with TLS and SuperNode authentication and three real SuperNodes on
loopback (certificates and keys made here; every process stopped by its PID at the end),
driven by the commands of the README's Deploy section (its "Train" command, then every
command after its
``<!-- withdrawal:`` marker, through fedforget's CLI): train; client-002's operator asks
to leave on its own node (``fedforget client withdraw --state-dir``); at the node's next
contact the server records it, bound to that node's authenticated node id, serves it by its
policy with ``rollback`` on the SuperNodes and delivers the receipt and salt to that node,
which verifies the receipt with the head it saved itself; then ``federaser`` serves the same
request on the SuperNodes. Rollback's model is the in-process retrain's, bit for bit.
Meanwhile a registered node claiming client-001's id (pinned to client-001's key in the
first run) is refused, and the round it came to goes on without it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import deploy_doc

from fedforget.cli import main
from fedforget.config import load_config
from fedforget.engine import run_training, run_unlearning
from fedforget.engine.deployment import LocalDeployment
from fedforget.history import HistoryStore
from fedforget.results import UnlearningOutcome
from fedforget.rundir import RESULT_FILE, RunDirectory
from fedforget.withdrawal import WithdrawalLedger

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

MARK = "<!-- withdrawal:"
LEAVING = 2  # client-002 asks to leave (and consents to figures on its own data)


def _bash_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith(("#", "export ")):
                lines.append(line)
    return lines


def doc_withdrawal_commands() -> list[str]:
    """The commands after the doc's withdrawal marker, in order."""
    text = deploy_doc()
    assert MARK in text, f"the README's Deploy section has no {MARK!r} marker"
    return _bash_lines(text.split(MARK, 1)[1])


def _run(line: str, deploy: Path, receipt_id: str = "") -> int:
    """Run one doc command line through the CLI: ``$DEPLOY`` and ``$RECEIPT`` filled in,
    ``$(cat FILE)`` replaced by the file's content, as the shell would."""
    line = line.replace("$DEPLOY", str(deploy)).replace("$RECEIPT", receipt_id)
    line = re.sub(r"\$\(cat ([^)]+)\)", lambda m: Path(m.group(1)).read_text().strip(), line)
    argv = shlex.split(line)
    assert argv[0] == "fedforget", line
    return main(argv[1:])


def test_the_doc_shows_the_withdrawal_commands_in_order() -> None:
    heads = [" ".join(shlex.split(c)[:3]) for c in doc_withdrawal_commands()]
    assert [h.rsplit(" ", 1)[0] if "$DEPLOY" in h else h for h in heads] == [
        "fedforget client withdraw", "fedforget train", "fedforget unlearn",
        "fedforget client status", "fedforget receipt verify"]


def test_a_client_withdraws_itself_is_unlearned_on_the_supernodes_and_verifies_its_receipt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    withdraw, train_again, unlearn, status, verify = doc_withdrawal_commands()
    first_train = next(c for c in _bash_lines(deploy_doc().split(MARK, 1)[0])
                       if c.startswith("fedforget train") and "fedforget-local" in c)
    config_block = next(b for b in re.findall(r"```toml\n(.*?)```", deploy_doc(), re.S)
                        if b.startswith("# $DEPLOY/deploy.toml"))
    with LocalDeployment(tmp_path / "deploy", num_nodes=0) as federation:
        deploy = federation.directory
        monkeypatch.setenv("FLWR_HOME", str(federation.home))
        (deploy / "deploy.toml").write_text(config_block)
        run = RunDirectory(deploy / "runs" / "deployed")
        nodes = [federation.add_node(
            {"partition-id": i, "num-partitions": 3,
             **({"fedforget-consent": True} if i == LEAVING else {})}, name=f"node-{i}")
            for i in range(3)]
        state = nodes[LEAVING].state_dir
        # Prepare: the doc's training (3 rounds on the SuperNodes)
        assert _run(first_train, deploy) == 0
        with HistoryStore.open(run.path) as store:
            assert store.last_round == 3
            trained = store.model_digest(3)
        pins = json.loads(run.nodes.read_text())["pins"]
        assert pins == {f"client-00{i}": nodes[i].node_id for i in range(3)}
        # a registered node whose operator claims client-001 (its partition) joins
        impostor = federation.add_node({"partition-id": 1, "num-partitions": 3},
                                       name="impostor")
        # Execute: client-002's operator asks on its own node; the next contact serves it
        assert _run(withdraw, deploy) == 0
        assert _run(train_again, deploy) == 0
        with WithdrawalLedger(run.path) as ledger:
            request = ledger.for_client("client-002")
        assert request is not None and request.state == "done"
        asked = json.loads(run.asked(request.request_id).read_text())
        assert asked["node_id"] == nodes[LEAVING].node_id  # bound to its authenticated key
        refused = json.loads(run.nodes.read_text())["refused"]
        assert {(r["node_id"], r["client_id"]) for r in refused} == {
            (impostor.node_id, "client-001")}
        with HistoryStore.open(run.path) as store:  # round 4 went on without both
            assert store.last_round == 4
            assert [p.client_id for p in store.round(4).participants] == [
                "client-000", "client-001"]
            fourth = store.model_digest(4)
        rollback = UnlearningOutcome.read(run.result_dir(request.request_id, "rollback")
                                          / RESULT_FILE)
        # the node holds its receipt and verifies it offline with the head it saved itself
        # (before a later run shows it a newer one)
        capsys.readouterr()
        assert _run(status, deploy) == 0
        receipt_id = json.loads((state / "withdrawal.json").read_text())["receipt_id"]
        assert receipt_id in capsys.readouterr().out
        assert _run(verify, deploy, receipt_id) == 0
        out = capsys.readouterr().out
        assert "consistency proof from size 3" in out  # the head the node saved, round 3
        salt = (state / "receipts" / f"{receipt_id}.salt").read_text().strip()
        assert main(["receipt", "verify", str(state / "receipts" / f"{receipt_id}.json"),
                     "--key", str(state / "server.pub"), "--head", str(state / "head.json"),
                     "--salt", salt, "--client", "client-002",
                     "--model", str(run.path / rollback.model_path)]) == 0
        assert not list(run.outbox(request.request_id).glob("*.salt"))
        # then federaser on the same request, on the SuperNodes too
        assert _run(unlearn, deploy) == 0
        federaser = UnlearningOutcome.read(run.result_dir(request.request_id, "federaser")
                                           / RESULT_FILE)
    # Assert: both served on the deployment, with the clients' work
    for outcome in (rollback, federaser):
        assert outcome.engine == "deployment" and outcome.forgotten == ["client-002"]
        assert outcome.original_model_digest == fourth
        # figures on client-002's data came from its node (it consented)
        assert outcome.metrics["forgotten_figures"]["answered"] == ["client-002"]
        assert set(outcome.metrics["forgotten_accuracy"]) == {"original", "unlearned",
                                                              "retrained"}
        assert outcome.metrics["shadow_attack"] is None  # needs its data on the server
    assert federaser.cost.client_epochs > 0 and federaser.cost.client_seconds > 0
    assert rollback.reference.bit_identical  # the deployed retrain's model
    # Rollback on the SuperNodes = the in-process engine's retrain, bit for bit
    cfg = load_config(deploy / "deploy.toml", **{"num-rounds": 4})
    reference = tmp_path / "inprocess"
    run_training(cfg, out=reference, engine="inprocess", progress=False)
    with HistoryStore.open(reference) as store:
        assert store.model_digest(3) == trained
    retrain = run_unlearning(reference, client="client-002", method="retrain",
                             progress=False)
    assert retrain is not None and retrain.model_digest == rollback.model_digest

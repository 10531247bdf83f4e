"""Client identity: the first node claiming a client id speaks for it; with SuperNode
authentication (stable node ids) the claim is pinned across runs; others are refused while
training goes on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import run_config_for, small_config
from flwr.app import Context, RecordDict

from fedforget.engine.apps import find_project
from fedforget.engine.inprocess import SUPERLINK_NODE_ID, InProcessGrid
from fedforget.history import HistoryStore
from fedforget.identity import NodePins
from fedforget.rundir import RunDirectory


def _run(out: Path, node_ids: list[int], node_configs: list[dict[str, Any]],
         **settings: Any) -> None:
    """Run fedforget's app in-process against nodes with the given (stable) node ids."""
    from flwr.supercore.task_identity import TaskIdentity

    server_app, client_app = find_project().load()
    rounds = settings.pop("rounds", 3)
    run_config = run_config_for(small_config(**{"num-rounds": rounds}), out, **settings)
    grid = InProcessGrid(client_app, num_nodes=len(node_ids), run_config=run_config,
                         node_configs=node_configs)
    contexts = list(grid._contexts.values())
    grid._contexts = {}
    for node_id, context in zip(node_ids, contexts, strict=True):
        context.node_id = node_id
        grid._contexts[node_id] = context
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        grid.run.run_id, SUPERLINK_NODE_ID, 1)
    server_app(grid, Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID,
                             node_config={}, state=RecordDict(), run_config=run_config))


def test_pins_refuse_a_second_claimant_only_when_node_ids_are_authenticated() -> None:
    pins = NodePins(None, pin=True)
    claimed: dict[str, int] = {}
    assert pins.check("client-001", 11, claimed) is None
    claimed["client-001"] = 11
    refusal = pins.check("client-001", 12, claimed)
    assert refusal is not None and "node 11" in refusal.reason
    # a later identification, the pinned node absent: still refused
    later = pins.check("client-001", 12, {})
    assert later is not None and "pinned to node 11" in later.reason
    assert pins.check("client-001", 11, {}) is None
    # without authentication nothing is pinned: a new node id is the client next time
    open_pins = NodePins(None, pin=False)
    assert open_pins.check("client-001", 11, {}) is None
    assert open_pins.check("client-001", 12, {}) is None


def test_a_node_claiming_a_connected_clients_id_is_refused_and_training_goes_on(
        tmp_path: Path) -> None:
    # Prepare: 4 nodes plus a fifth whose node config claims client-001's id
    out = tmp_path / "run"
    configs: list[dict[str, Any]] = [{} for _ in range(4)] + [{"client-id": "client-001"}]
    # Execute
    _run(out, [101, 102, 103, 104, 105], configs)
    # Assert: trained all rounds with the four, the impostor (answered second) refused
    with HistoryStore.open(out) as store:
        assert store.last_round == 3
        assert store.clients()["client-001"] == [1, 2, 3]
        assert sorted(store.roster()) == ["client-000", "client-001", "client-002",
                                          "client-003"]
    nodes = json.loads(RunDirectory(out).nodes.read_text())
    assert [(r["node_id"], r["client_id"]) for r in nodes["refused"]] == [(105, "client-001")]
    assert nodes["pins"] == {}  # no authentication: nothing pinned


def test_with_node_auth_a_pinned_client_id_is_refused_to_another_node_even_in_its_absence(
        tmp_path: Path) -> None:
    # Prepare: a first run pins client-000..003 to nodes 101..104
    out = tmp_path / "run"
    _run(out, [101, 102, 103, 104], [{} for _ in range(4)], node_auth=True, rounds=2)
    pins = json.loads(RunDirectory(out).nodes.read_text())["pins"]
    assert pins == {"client-000": 101, "client-001": 102, "client-002": 103,
                    "client-003": 104}
    # Execute: resume to 4 rounds; node 102 is gone and node 999 claims client-001
    _run(out, [101, 999, 103, 104], [{} for _ in range(4)], node_auth=True, rounds=4)
    # Assert: node 999 refused; rounds 3-4 trained without client-001 (not connected)
    nodes = json.loads(RunDirectory(out).nodes.read_text())
    assert [(r["node_id"], r["client_id"]) for r in nodes["refused"]] == [(999, "client-001")]
    assert "pinned to node 102" in nodes["refused"][0]["reason"]
    with HistoryStore.open(out) as store:
        assert store.last_round == 4
        assert store.clients()["client-001"] == [1, 2]
        assert store.clients()["client-000"] == [1, 2, 3, 4]

"""Figures on a forgotten client's data computed on its own node, only with its consent."""

from __future__ import annotations

from pathlib import Path

from conftest import run_config_for, small_config, train_small
from flwr.serverapp.strategy import FedAvg

from fedforget.arrays import load_tensors
from fedforget.engine.apps import find_project
from fedforget.engine.inprocess import InProcessGrid
from fedforget.evaluation.membership import confidence_threshold_auc, loss_threshold_auc
from fedforget.evaluation.on_client import ask_forgotten_figures, consents
from fedforget.federation import FederationApp, GridFederation, identify_clients
from fedforget.history import HistoryStore
from fedforget.measure import TaskMeasure
from fedforget.settings import RecordingSettings
from fedforget.task import new_model
from fedforget.training import evaluate


def _federation(out: Path, consenting: set[int]) -> GridFederation:
    cfg = small_config()
    _, client_app = find_project().load()
    grid = InProcessGrid(
        client_app, num_nodes=cfg.num_clients, run_config=run_config_for(cfg, out),
        node_configs=[{"fedforget-consent": "true"} if i in consenting else {}
                      for i in range(cfg.num_clients)],
    )
    clients = identify_clients(grid, cfg.num_clients)
    return GridFederation(grid, clients, app=FederationApp(strategy=FedAvg(),
                                                           train_config={}),
                          settings=RecordingSettings(seed=cfg.seed), progress=False)


def test_consent_is_an_explicit_yes() -> None:
    assert consents({"fedforget-consent": "true"}) and consents({"fedforget-consent": True})
    assert not consents({}) and not consents({"fedforget-consent": "false"})
    assert not consents({"fedforget-consent": "no"})


def test_a_consenting_client_computes_on_its_node_what_the_server_computes_in_simulation(
        tmp_path: Path) -> None:
    # Prepare: a trained run; client-001 consents, client-002 does not
    out = tmp_path / "run"
    train_small(out)
    federation = _federation(out, consenting={1})
    with HistoryStore.open(out) as store:
        models = {"original": store.global_model(3), "unlearned": store.global_model(1)}
    # Execute
    figures = ask_forgotten_figures(federation, models, {"client-001"})
    refused = ask_forgotten_figures(federation, models, {"client-002"})
    # Assert: the figures the server computes from the data it rebuilds in simulation
    cfg = small_config()
    members, non_members = TaskMeasure(cfg).forgotten_data({"client-001"})
    assert members is not None and non_members is not None
    for name, tensors in models.items():
        model = load_tensors(new_model(cfg), tensors)
        assert figures["forgotten_accuracy"][name] == evaluate(model, members).accuracy
        assert figures["mia_loss_auc"][name] == loss_threshold_auc(model, members, non_members)
        assert (figures["mia_confidence_auc"][name]
                == confidence_threshold_auc(model, members, non_members))
    assert figures["forgotten_figures"]["answered"] == ["client-001"]
    # no consent: not available, never estimated
    assert refused["forgotten_accuracy"] is None and refused["mia_loss_auc"] is None
    assert refused["forgotten_figures"]["source"].startswith("not available")
    assert "client-002" in refused["forgotten_figures"]["missing"]
    # and measuring is not counted as the method's cost
    assert federation.cost.client_epochs == 0 and federation.cost.rounds == 0


def test_several_forgotten_clients_pool_accuracy_by_examples_and_give_no_pooled_auc(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_small(out)
    federation = _federation(out, consenting={0, 3})
    with HistoryStore.open(out) as store:
        models = {"original": store.global_model(3)}
    figures = ask_forgotten_figures(federation, models, {"client-000", "client-003"})
    by_client = figures["forgotten_by_client"]
    a0, a3 = (by_client[c]["original"] for c in ("client-000", "client-003"))
    expected = ((a0["forgotten-accuracy"] * a0["num-examples"]
                 + a3["forgotten-accuracy"] * a3["num-examples"])
                / (a0["num-examples"] + a3["num-examples"]))
    assert abs(figures["forgotten_accuracy"]["original"] - expected) < 1e-12
    assert figures["mia_loss_auc"] is None  # an AUC is not pooled from per-client AUCs
    assert set(by_client) == {"client-000", "client-003"}


def test_only_a_superlinks_grid_counts_as_a_deployment(tmp_path: Path) -> None:
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedforget.engine.polling import PollingGrid
    from fedforget.evaluation.on_client import is_deployment_grid

    deployed = HttpGrid.__new__(HttpGrid)  # (no SuperLink needed to tell its type)
    assert is_deployment_grid(deployed) and is_deployment_grid(PollingGrid(deployed))
    _, client_app = find_project().load()
    local = InProcessGrid(client_app, num_nodes=1, run_config={})
    assert not is_deployment_grid(local) and not is_deployment_grid(None)

"""Training on the in-process engine: determinism, records, sampling, bad replies."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config_for, small_config, train_small
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedforget.engine import run_training
from fedforget.engine.apps import find_project
from fedforget.engine.inprocess import run_inprocess
from fedforget.errors import HistoryError, RoundFailedError
from fedforget.history import HistoryStore, verify_store
from fedforget.sampling import ClientSampler, client_train_seed
from fedforget.task import load_client_data


def test_the_same_config_gives_the_same_final_model(tmp_path: Path, trained_run: Path) -> None:
    # Execute: a second, independent run of the same config (new random node ids).
    again = train_small(tmp_path / "again")
    with HistoryStore.open(trained_run) as store:
        first = store.summary()
    # Assert
    assert again["final_model_digest"] == first["final_model_digest"]
    assert again["rounds"] == first["rounds"] == 3


def test_another_seed_gives_another_model(tmp_path: Path, trained_run: Path) -> None:
    other = train_small(tmp_path / "other", seed=8)
    with HistoryStore.open(trained_run) as store:
        assert other["final_model_digest"] != store.summary()["final_model_digest"]


def test_each_round_is_the_example_weighted_average_of_the_stored_updates(
    trained_run: Path,
) -> None:
    # FedAvg: θ_{t+1} = Σ_k n_k/n · θ_{t,k} = θ_t + Σ_k n_k/n · Δ_{t,k}
    cfg = small_config()
    sizes = {f"client-{i:03d}": len(load_client_data(cfg, i)[0]) for i in range(4)}
    with HistoryStore.open(trained_run) as store:
        for record in store.rounds():
            before = store.global_model(record.round - 1)
            after = store.global_model(record.round)
            ids = [p.client_id for p in record.participants]
            assert ids == sorted(sizes)
            assert {p.client_id: p.num_examples for p in record.participants} == sizes
            total = sum(sizes.values())
            expected = {k: v.astype(np.float64) for k, v in before.items()}
            for p in record.participants:
                update = store.client_update(record.round, p.client_id)
                assert p.weight == pytest.approx(sizes[p.client_id] / total)
                for k in expected:
                    expected[k] += sizes[p.client_id] / total * update[k]
            for k in expected:
                np.testing.assert_allclose(after[k], expected[k], rtol=0, atol=1e-6)


def test_clients_train_with_the_seed_the_server_derived(trained_run: Path) -> None:
    with HistoryStore.open(trained_run) as store:
        record = store.round(2)
    for p in record.participants:
        assert p.seed == client_train_seed(7, 2, p.client_id)
    assert record.config["local-epochs"] == 1
    assert record.config["batch-size"] == 16
    assert record.config["learning-rate"] == 0.1


def test_clients_are_sampled_by_stable_id_with_the_run_seed(tmp_path: Path) -> None:
    train_small(tmp_path / "run", **{"sample-count": 2, "num-rounds": 4})
    roster = [f"client-{i:03d}" for i in range(4)]
    sampler = ClientSampler(seed=7, count=2)
    with HistoryStore.open(tmp_path / "run") as store:
        for record in store.rounds():
            got = [p.client_id for p in record.participants]
            assert got == sampler.sample(record.round, roster)


def test_retention_interval_and_codec(tmp_path: Path) -> None:
    summary = train_small(
        tmp_path / "run", **{"num-rounds": 4, "retain-interval": 2, "codec": "bf16"}
    )
    assert summary["retained_rounds"] == [1, 3]
    assert summary["codec"] == "bf16"
    with HistoryStore.open(tmp_path / "run") as store:
        kept = store.client_update(3, "client-000")
        assert all(v.dtype == np.float32 for v in kept.values())
        with pytest.raises(HistoryError, match="round 2"):
            store.client_update(2, "client-000")
        assert store.round(2).participants[0].update_digest.startswith("sha256:")


def test_fedprox_runs_and_sends_its_proximal_term(tmp_path: Path) -> None:
    train_small(tmp_path / "run", strategy="fedprox", **{"proximal-mu": 0.5})
    with HistoryStore.open(tmp_path / "run") as store:
        assert store.round(1).config["proximal-mu"] == 0.5


def _faulty_client_app() -> ClientApp:
    """The real ClientApp, except that three clients misbehave in every round."""
    from clients.app import train
    from fedforget.flower import client_id_of, unlearning_mod

    app = ClientApp(mods=[unlearning_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        cid = client_id_of(context)
        if cid == "client-003":
            raise RuntimeError("disk on fire")
        reply = train(msg, context)
        arrays = reply.content["arrays"]
        if cid == "client-001":  # NaN in one tensor
            first = next(iter(arrays))
            bad = arrays[first].numpy().copy()
            bad.flat[0] = np.nan
            arrays[first] = Array(bad)
        if cid == "client-002":  # a renamed tensor
            reply.content["arrays"] = ArrayRecord(
                {f"x.{k}": v for k, v in arrays.items()}
            )
        return reply

    return app


def test_bad_replies_are_refused_with_a_reason_and_the_round_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = small_config()
    server_app, _ = find_project().load()
    with caplog.at_level(logging.WARNING, logger="fedforget.strategies"):
        run_inprocess(server_app, _faulty_client_app(), num_nodes=4,
                      run_config=run_config_for(cfg, tmp_path / "run"))
    with HistoryStore.open(tmp_path / "run") as store:
        record = store.round(1)
        assert [p.client_id for p in record.participants] == ["client-000"]
        reasons = {r.client_id: r.reason for r in record.refused}
    assert "NaN/Inf" in reasons["client-001"]
    assert "wrong keys" in reasons["client-002"]
    assert "disk on fire" in reasons["client-003"]
    assert "round 1: refused reply from client client-001" in caplog.text
    assert verify_store(tmp_path / "run").ok


def test_too_few_valid_replies_fail_the_round_and_store_nothing_of_it(tmp_path: Path) -> None:
    cfg = small_config(**{"min-replies": 2})
    server_app, _ = find_project().load()
    with pytest.raises(RoundFailedError, match=r"round 1: 1 valid replies of 4 selected, "
                                               r"min-replies = 2"):
        run_inprocess(server_app, _faulty_client_app(), num_nodes=4,
                      run_config=run_config_for(cfg, tmp_path / "run"))
    with HistoryStore.open(tmp_path / "run") as store:
        assert store.last_round == 0
    assert verify_store(tmp_path / "run").ok


def test_resuming_with_another_config_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    before = train_small(out)
    with pytest.raises(HistoryError, match=r"model = 'mlp' \(now 'logreg'\)"):
        run_training(small_config(model="logreg"), out=out, engine="inprocess", progress=False)
    with HistoryStore.open(out) as store:
        assert store.summary()["final_model_digest"] == before["final_model_digest"]


def test_a_finished_run_resumed_trains_nothing_more(tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = train_small(out)
    after = train_small(out)
    assert after["rounds"] == before["rounds"]
    assert after["final_model_digest"] == before["final_model_digest"]


def test_the_wrappers_fedavg_shortcut_is_bit_identical_to_flowers_fedavg(
    tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A FedAvg subclass that overrides aggregate_train makes the wrapper delegate to
    # Flower's own aggregation instead of aggregating the arrays it already decoded.
    from flwr.serverapp.strategy import FedAvg

    find_project().load()
    import server.app

    class DelegatingFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            return super().aggregate_train(server_round, replies)

    monkeypatch.setattr(server.app, "build_strategy", lambda cfg: DelegatingFedAvg(
        fraction_train=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1))
    delegated = train_small(tmp_path / "delegated")
    with HistoryStore.open(trained_run) as store:
        assert delegated["final_model_digest"] == store.summary()["final_model_digest"]


def test_resuming_with_fewer_rounds_than_stored_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_small(out, **{"num-rounds": 3})
    with pytest.raises(HistoryError, match="holds 3 rounds; num_rounds = 2 would train none"):
        train_small(out, **{"num-rounds": 2})

"""The whole evaluation protocol in every unlearning result, end to end on the in-process engine.

Expected values come from properties (an exact method's model *is* the retrained one, so
every figure comparing them is zero or equal) and from measurements the tests make
themselves on the model files and data, not from the code's own report.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import train_small

from fedforget.arrays import load_tensors
from fedforget.cli import format_comparison, main
from fedforget.config import RunConfig
from fedforget.history import HistoryStore
from fedforget.results import UnlearningOutcome
from fedforget.task import load_client_data, load_test_set, new_model
from fedforget.tensors import decode, tensors_digest
from fedforget.training import evaluate
from fedforget.unlearning import get_method
from fedforget.unlearning.base import ClientUpdate, Cost, UnlearningRequest

Tensors = dict[str, np.ndarray]
MODELS = ("original", "unlearned", "retrained")


# ------------------------------------------------------------------ helpers
@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared trained run (unlearning writes into it)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def unlearn(run: Path, client: str, method: str, capsys: pytest.CaptureFixture[str],
            *extra: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["unlearn", str(run), "--client", client, "--method", method, "--json",
                 "--quiet", *extra]) == 0
    info: dict[str, Any] = json.loads(capsys.readouterr().out)
    return info


def config_of(run: Path) -> RunConfig:
    with HistoryStore.open(run) as store:
        return RunConfig.from_mapping(store.run_config)


def accuracy_of(cfg: RunConfig, tensors: Mapping[str, np.ndarray], data: Any) -> float:
    return evaluate(load_tensors(new_model(cfg), tensors), data).accuracy


def read(path: str | Path) -> Tensors:
    return decode(Path(path).read_bytes())


# ------------------------------------------------------------ exact methods
def test_retrain_is_at_zero_distance_and_scores_as_the_retrained_model(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    info = unlearn(run, "client-001", "retrain", capsys)
    m = info["metrics"]
    # Assert: the unlearned model is the retrained one, so every comparison is 0 or equal
    assert m["l2_to_retrained"]["unlearned"] == 0.0
    assert m["kl_to_retrained"]["unlearned"] == 0.0
    assert m["js_to_retrained"]["unlearned"] == 0.0
    assert m["cosine_to_retrained"]["unlearned"] == pytest.approx(0.0, abs=1e-12)
    for key in ("test_accuracy", "forgotten_accuracy", "mia_loss_auc", "mia_confidence_auc",
                "shadow_attack"):
        assert set(m[key]) == set(MODELS), key
        assert m[key]["unlearned"] == m[key]["retrained"], key
    # ... and the original model was trained with client-001, so it is not
    assert m["l2_to_retrained"]["original"] > 0.0
    assert m["kl_to_retrained"]["original"] > 0.0
    for attack in m["shadow_attack"].values():
        assert set(attack) == {"precision", "recall", "auc"}
        assert all(0.0 <= v <= 1.0 for v in attack.values())
    for key in ("mia_loss_auc", "mia_confidence_auc"):
        assert all(0.0 <= v <= 1.0 for v in m[key].values())
    json.dumps(info, allow_nan=False)  # canonical-friendly: no NaN, no infinity


def test_the_membership_attacks_use_the_forgotten_clients_train_and_held_out_splits(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    cfg = config_of(run)
    train, _ = load_client_data(cfg, 1)
    # Execute
    info = unlearn(run, "client-001", "federaser", capsys)
    # Assert: the forgotten-data accuracy is the unlearned model's on client-001's training
    # split, measured here from the model file
    expected = accuracy_of(cfg, read(info["model_path"]), train)
    assert info["metrics"]["forgotten_accuracy"]["unlearned"] == expected


def test_client_impact_covers_exactly_the_remaining_clients(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    cfg = config_of(run)
    with HistoryStore.open(run) as store:
        remaining = sorted(set(store.roster()) - {"client-002"})
        original = store.global_model(store.last_round)
    # Execute
    info = unlearn(run, "client-002", "federaser", capsys)
    m = info["metrics"]
    # Assert: every remaining client, and only them, each accuracy measured here on the
    # client's held-out split; the change is after minus before
    unlearned = read(info["model_path"])
    assert sorted(m["client_impact"]["changes"]) == remaining
    for cid in remaining:
        _, holdout = load_client_data(cfg, int(cid.split("-")[1]))
        before, after = accuracy_of(cfg, original, holdout), accuracy_of(cfg, unlearned, holdout)
        assert m["client_accuracy"]["original"][cid] == pytest.approx(before)
        assert m["client_accuracy"]["unlearned"][cid] == pytest.approx(after)
        assert m["client_impact"]["changes"][cid] == pytest.approx(after - before)
    worst = [w["client"] for w in m["client_impact"]["worst"]]
    assert len(worst) == 3 and set(worst) <= set(remaining)


def test_a_second_withdrawal_leaves_both_withdrawn_clients_out_of_the_impact(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: pga forgets one client per request, so the second request's forget set is
    # client-003 alone; client-000 has withdrawn too and is no remaining client either
    unlearn(run, "client-000", "subtract", capsys)
    info = unlearn(run, "client-003", "pga", capsys)
    # Assert
    assert info["forgotten"] == ["client-003"]
    assert sorted(info["metrics"]["client_impact"]["changes"]) == ["client-001", "client-002"]


def test_storage_is_the_size_of_the_history_blobs(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the bytes of every blob file of the history, counted on disk
    on_disk = sum(p.stat().st_size for p in (run / "blobs").rglob("*") if p.is_file())
    # Execute
    info = unlearn(run, "client-001", "subtract", capsys)
    # Assert
    assert info["metrics"]["storage_bytes"] == on_disk > 0


# -------------------------------------------------------------------- trace
def test_the_retrain_trace_is_every_round_and_ends_at_the_unlearned_accuracy(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    cfg = config_of(run)
    # Execute
    info = unlearn(run, "client-001", "retrain", capsys)
    trace = info["metrics"]["trace"]
    # Assert
    assert [p["round"] for p in trace] == list(range(1, cfg.num_rounds + 1))
    final = accuracy_of(cfg, read(info["model_path"]), load_test_set(cfg))
    assert trace[-1]["test_accuracy"] == final == info["metrics"]["test_accuracy"]["unlearned"]


def test_the_rollback_trace_covers_every_round_and_equals_retrains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: two clients per round, so that some client first takes part after round 1
    run = tmp_path / "run"
    train_small(run, **{"num-rounds": 4, "sample-count": 2})
    cfg = config_of(run)
    with HistoryStore.open(run) as store:
        firsts = {cid: rounds[0] for cid, rounds in store.clients().items() if rounds}
        client = max(sorted(firsts), key=lambda c: firsts[c])
        t0 = firsts[client]
        assert t0 > 1, f"the test needs a client joining late; first rounds {firsts}"
        before = [accuracy_of(cfg, store.global_model(t), load_test_set(cfg))
                  for t in range(1, t0)]
    # Execute
    rolled = unlearn(run, client, "rollback", capsys)["metrics"]["trace"]
    retrained = unlearn(run, client, "retrain", capsys)["metrics"]["trace"]
    # Assert: rounds 1..T; those before t0 are the original run's models, unchanged
    assert [p["round"] for p in rolled] == list(range(1, cfg.num_rounds + 1))
    assert [p["test_accuracy"] for p in rolled[: t0 - 1]] == before
    assert rolled == retrained


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("federaser", ()),
        ("fedrecover", ()),
        ("subtract", ("--set", "repair-rounds=2")),
        ("fedrecovery", ("--set", "noise=false")),
        ("pga", ("--set", "post-rounds=2")),
        ("fukd", ("--set", "epochs=0", "--set", "post-rounds=2")),
    ],
)
def test_an_approximate_methods_trace_rises_in_rounds_and_ends_at_its_model(
    run: Path, capsys: pytest.CaptureFixture[str], method: str, extra: Sequence[str]
) -> None:
    # Prepare
    cfg = config_of(run)
    # Execute
    info = unlearn(run, "client-001", method, capsys, *extra)
    trace = info["metrics"]["trace"]
    # Assert: strictly increasing rounds; the last model reported is the one returned
    rounds = [p["round"] for p in trace]
    assert rounds and all(a < b for a, b in zip(rounds, rounds[1:], strict=False))
    final = accuracy_of(cfg, read(info["model_path"]), load_test_set(cfg))
    assert trace[-1]["test_accuracy"] == final


def test_fukds_post_rounds_cost_the_remaining_clients_epochs_on_the_engine(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: every client trains every round of this run (4 clients, all per round)
    cfg = config_of(run)
    assert cfg.clients_per_round() == cfg.num_clients
    # Execute: the subtraction alone (no proxy set here), then 2 post rounds
    info = unlearn(run, "client-001", "fukd", capsys, "--set", "epochs=0",
                   "--set", "post-rounds=2")
    # Assert: 2 rounds × the 3 remaining clients × their local epochs; rounds T+1, T+2
    assert info["cost"]["client_epochs"] == 2 * (cfg.num_clients - 1) * cfg.local_epochs
    assert [p["round"] for p in info["metrics"]["trace"]][-2:] == [cfg.num_rounds + 1,
                                                                   cfg.num_rounds + 2]


def test_the_federaser_trace_follows_the_replayed_rounds(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: every client took part from round 1 and every round is retained
    trace = unlearn(run, "client-001", "federaser", capsys)["metrics"]["trace"]
    # Assert
    assert [p["round"] for p in trace] == [1, 2, 3]


# ----------------------------------------------------------------- observer
class ShiftingFederation:
    """Every client returns the global model shifted by a constant of its own (train) or
    by -0.05 (the pga ascent); no recording, no cost beyond the epochs."""

    def __init__(self, roster: Sequence[str]) -> None:
        self.cost = Cost()
        self._roster = tuple(sorted(roster))

    @property
    def roster(self) -> tuple[str, ...]:
        return self._roster

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.cost.client_epochs += len(clients) * (local_epochs or 1)
        out = {}
        for cid in clients:
            shift = -0.05 if task == "pga" else 0.01 * (1 + self._roster.index(cid))
            out[cid] = ClientUpdate(cid, {k: (v + shift).astype(v.dtype)
                                          for k, v in global_model.items()}, 10)
        return out

    def replay(self, **kwargs: Any) -> Tensors:
        raise AssertionError("not used by the methods under test")

    def evaluate_local(self, model: Tensors, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used by the methods under test")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("federaser", {}),
        ("fedrecover", {}),
        ("subtract", {"repair-rounds": 2}),
        ("fedrecovery", {}),
        ("pga", {"post-rounds": 2}),
        ("fukd", {"epochs": 0, "post-rounds": 2}),
    ],
)
def test_the_observer_does_not_change_the_model_a_method_returns(
    run: Path, tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    # Prepare
    seen: list[tuple[int, str]] = []

    def observe(server_round: int, model: Mapping[str, np.ndarray]) -> None:
        seen.append((server_round, tensors_digest(dict(model))))

    with HistoryStore.open(run) as store:
        def request(observer: Any, name: str) -> UnlearningRequest:
            return UnlearningRequest(
                store=store, forget=frozenset({"client-001"}),
                federation=ShiftingFederation(store.roster()),
                workdir=str(tmp_path / name), observe=observer,
            )

        # Execute
        plain = get_method(method, params).unlearn(request(None, "plain")).model
        observed = get_method(method, params).unlearn(request(observe, "observed")).model
    # Assert: the same model with and without an observer; the rounds reported rise and the
    # last model reported is the one returned
    assert tensors_digest(observed) == tensors_digest(plain)
    rounds = [t for t, _ in seen]
    assert rounds and all(a < b for a, b in zip(rounds, rounds[1:], strict=False))
    assert seen[-1][1] == tensors_digest(observed)


# ---------------------------------------------------------------- text output
def test_the_text_summary_shows_the_attacks_divergences_and_worst_clients(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    info = unlearn(run, "client-001", "federaser", capsys)
    m = info["metrics"]
    # Execute
    text = format_comparison(UnlearningOutcome.read(info["result_path"]), run)
    # Assert
    assert "MIA AUC, loss" in text and "MIA AUC, confidence" in text
    assert "shadow MIA precision" in text and "shadow MIA recall" in text
    kl = m["kl_to_retrained"]
    assert f"KL original {kl['original']:.4f}, unlearned {kl['unlearned']:.4f}" in text
    worst = m["client_impact"]["worst"][0]
    assert f"worst {worst['client']} {100 * worst['change']:+.2f}" in text
    assert not math.isnan(m["js_to_retrained"]["unlearned"])

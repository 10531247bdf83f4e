"""Tests of FedRecover: the L-BFGS product, the schedule of exact rounds, recovery, refusals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedforget.arrays import load_tensors, model_tensors
from fedforget.config import RunConfig
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore, ParticipantUpdate
from fedforget.sampling import client_train_seed
from fedforget.task import load_client_data, new_model
from fedforget.training import train_local
from fedforget.unlearning.base import (
    METHODS,
    ClientUpdate,
    Cost,
    RetentionError,
    UnlearningRequest,
)
from fedforget.unlearning.fedrecover import (
    FedRecover,
    FedRecoverParams,
    abnormality_threshold,
    exact_schedule,
    lbfgs_hvp,
)

# ----------------------------------------------------------------------------- fakes
SHAPES = {"w": (2, 2), "b": (2,)}


class QuadraticFederation:
    """Client k takes one gradient step on f_k(w) = a_k/2 ‖w − c_k‖²: w ← w − η a_k (w − c_k).

    Its update is linear in the model with Jacobian −η a_k I, so FedRecover's L-BFGS
    estimate is exact and the recovery must equal retraining.
    """

    def __init__(self, clients: Mapping[str, tuple[float, dict[str, np.ndarray], int]],
                 lr: float = 0.2) -> None:
        self.clients = dict(clients)
        self.lr = lr
        self.cost = Cost()
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return tuple(sorted(self.clients))

    def step(self, cid: str, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, target, _ = self.clients[cid]
        return {k: (np.asarray(model[k], np.float64)
                    - self.lr * a * (np.asarray(model[k], np.float64) - target[k]))
                .astype(np.float32) for k in SHAPES}

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        assert task == "train"
        self.calls.append((server_round, tuple(clients)))
        self.cost.client_epochs += len(clients)
        self.cost.rounds += 1
        return {c: ClientUpdate(c, self.step(c, global_model), self.clients[c][2])
                for c in clients}

    def replay(self, **kwargs: Any) -> dict[str, np.ndarray]:
        raise AssertionError("fedrecover must not replay recorded rounds")

    def evaluate_local(self, model: Any, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def fedavg_round(fed: QuadraticFederation, model: dict[str, np.ndarray],
                 clients: Iterable[str]) -> tuple[dict[str, np.ndarray], list[ParticipantUpdate]]:
    clients = sorted(clients)
    total = sum(fed.clients[c][2] for c in clients)
    new = {k: np.asarray(v, np.float64) for k, v in model.items()}
    participants = []
    for c in clients:
        local = fed.step(c, model)
        update = {k: (local[k].astype(np.float64) - model[k]).astype(np.float32) for k in SHAPES}
        n = fed.clients[c][2]
        for k in SHAPES:
            new[k] += n / total * update[k]
        participants.append(ParticipantUpdate(client_id=c, num_examples=n, weight=n / total,
                                              seed=0, update=update))
    return {k: v.astype(np.float32) for k, v in new.items()}, participants


def record_run(path: Path, fed: QuadraticFederation, theta0: dict[str, np.ndarray],
               participants: Sequence[Iterable[str]], retain_interval: int = 1) -> HistoryStore:
    """Train len(participants) FedAvg rounds with the fake, recording them."""
    store = HistoryStore.create(path, run_config={"seed": 0}, retain_interval=retain_interval,
                                fsync=False)
    store.put_initial_model(theta0)
    model = theta0
    for t, clients in enumerate(participants, start=1):
        new, updates = fedavg_round(fed, model, clients)
        store.commit_round(round=t, global_before=store.model_digest(t - 1), global_after=new,
                           participants=updates, config={})
        model = new
    return store


def retrain(fed: QuadraticFederation, theta0: dict[str, np.ndarray],
            participants: Sequence[Iterable[str]], forget: str) -> dict[str, np.ndarray]:
    model = theta0
    for clients in participants:
        remaining = [c for c in clients if c != forget]
        if remaining:
            model, _ = fedavg_round(fed, model, remaining)
    return model


def random_tensors(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def request(store: HistoryStore, fed: QuadraticFederation, forget: str,
            tmp_path: Path) -> UnlearningRequest:
    return UnlearningRequest(store=store, forget=frozenset({forget}),
                             federation=fed, workdir=str(tmp_path / "work"))


# ------------------------------------------------------------------------- L-BFGS
def test_lbfgs_reproduces_the_hessian_on_the_span_of_conjugate_pairs() -> None:
    # Prepare: H = diag(2, 5, 7), pairs along e1, e2 (H-conjugate), y_i = H s_i.
    # By hand: S^T Y = diag(2, 5), L = 0, D = diag(2, 5), σ = y2·s2 / s2·s2 = 5, so the
    # middle matrix is diag(5, 5, -2, -5) and H̃v = 5v - 5 (v1 e1 + v2 e2) + (2 v1 e1 + 5 v2 e2)
    # = (2 v1, 5 v2, 5 v3): H on span(e1, e2), σ on e3.
    h = np.diag([2.0, 5.0, 7.0])
    e = np.eye(3)

    # Execute
    product = lbfgs_hvp([e[0], e[1]], [h @ e[0], h @ e[1]], np.array([1.0, -2.0, 3.0]))

    # Assert
    np.testing.assert_allclose(product, [2.0, -10.0, 15.0], rtol=1e-12)


def test_lbfgs_one_pair_by_hand() -> None:
    # Prepare: one pair s = (1, 1), y = (3, 1): σ = 4/2 = 2; with s = 1 the formula reads
    # H̃v = σv − σ s (s·v)/(s·s) + y (y·v)/(s·y). For v = (1, 0): (2,0) − (1,1) + (3,1)·3/4.
    s, y, v = np.array([1.0, 1.0]), np.array([3.0, 1.0]), np.array([1.0, 0.0])

    # Execute
    product = lbfgs_hvp([s], [y], v)

    # Assert
    np.testing.assert_allclose(product, [2 - 1 + 9 / 4, -1 + 3 / 4], rtol=1e-12)
    np.testing.assert_allclose(lbfgs_hvp([s], [y], s), y, rtol=1e-12)  # secant condition


def test_lbfgs_rotated_quadratic_and_sign_convention() -> None:
    # Prepare: H = Q diag(1, 4, 9, 16) Qᵀ, pairs along three of its eigenvectors.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    h = q @ np.diag([1.0, 4.0, 9.0, 16.0]) @ q.T
    dw = [q[:, 0], 2 * q[:, 1], -q[:, 2]]
    dg = [h @ s for s in dw]
    v = 0.5 * q[:, 0] - q[:, 1] + 3 * q[:, 2]

    # Execute
    product = lbfgs_hvp(dw, dg, v)
    negated = lbfgs_hvp(dw, [-g for g in dg], v)

    # Assert: H v on the span; updates Δ = −g give the negated product (odd in ΔG)
    np.testing.assert_allclose(product, h @ v, atol=1e-10)
    np.testing.assert_allclose(negated, -product, atol=1e-10)


def test_lbfgs_refuses_a_pair_without_curvature() -> None:
    # Δg ⟂ Δw gives σ = 0 and D = 0: the middle matrix is zero
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        lbfgs_hvp([np.array([1.0, 0.0])], [np.array([0.0, 1.0])], np.array([1.0, 1.0]))


# ------------------------------------------------------------------------ schedule
def test_schedule_of_exact_rounds_by_hand() -> None:
    # Prepare: rounds 3..14 (n = 12), T_w = 3, T_c = 4, T_f = 2.
    # warm-up i < 3: rounds 3, 4, 5; final i >= 10: rounds 13, 14; corrections where
    # (i - 3 + 1) % 4 == 0: i = 6 (round 9) — i = 2 is warm-up, i = 10 final.

    # Execute
    schedule = exact_schedule(3, 14, warmup_rounds=3, correction_period=4, final_rounds=2)

    # Assert
    assert schedule == {3: "warm-up", 4: "warm-up", 5: "warm-up", 9: "correction",
                        13: "final", 14: "final"}


def test_schedule_without_correction_and_overlapping_phases() -> None:
    assert exact_schedule(1, 6, warmup_rounds=2, correction_period=0, final_rounds=1) == {
        1: "warm-up", 2: "warm-up", 6: "final"}
    assert exact_schedule(1, 3, warmup_rounds=5, correction_period=1, final_rounds=5) == {
        1: "warm-up", 2: "warm-up", 3: "warm-up"}
    assert exact_schedule(1, 5, warmup_rounds=1, correction_period=1, final_rounds=0) == {
        1: "warm-up", 2: "correction", 3: "correction", 4: "correction", 5: "correction"}


def test_abnormality_threshold_from_history_by_hand() -> None:
    # Round 1: |values| 0.5, 3, 1, 2; α = 0.25 allows 1 of 4 above τ_1: τ_1 = 2.
    # Round 2: |values| 0.1, 0.2; 0.5 of one value: τ_2 = 0.2. τ = max = 2.
    rounds = [[np.array([0.5, -3.0]), np.array([1.0, 2.0])], [np.array([0.1, -0.2])]]
    assert abnormality_threshold(rounds, 0.25) == 2.0
    assert abnormality_threshold(rounds, 0.0) == 3.0  # α = 0: the largest coordinate
    assert abnormality_threshold([], 0.1) == math.inf


# -------------------------------------------------------------------------- method
def quadratic_setup(tmp_path: Path, *, rounds: int, x_from: int, big: bool = False,
                    b_from: int = 1) -> tuple[QuadraticFederation, dict[str, np.ndarray],
                                              list[list[str]], HistoryStore]:
    rng = np.random.default_rng(11)
    clients = {
        "a": (1.0, random_tensors(rng), 30),
        "b": (0.5, random_tensors(rng), 20),
        "c": (1.5, random_tensors(rng), 10),
        "x": (1.0, random_tensors(rng, scale=5.0), 40),  # the one to forget
    }
    if big:  # a remaining client whose updates are ~100× larger
        clients["c"] = (1.0, random_tensors(rng, scale=300.0), 1)
    fed = QuadraticFederation(clients)
    theta0 = random_tensors(rng)
    schedule = [["a", "c"] + (["b"] if t >= b_from else []) + (["x"] if t >= x_from else [])
                for t in range(1, rounds + 1)]
    store = record_run(tmp_path / "run", fed, theta0, schedule)
    fed.calls.clear()
    fed.cost = Cost()
    return fed, theta0, schedule, store


def test_recovery_equals_retraining_on_isotropic_quadratics(tmp_path: Path) -> None:
    # Prepare: x joins in round 3 of 10; T_w = 3, T_c = 3, T_f = 2, τ = ∞ (off).
    # Replayed rounds 3..10: warm-up 3 (from history), 4, 5; correction at i = 5 (round 8);
    # final 9, 10. Exact updates asked in rounds 4, 5, 8, 9, 10 of a, b and c.
    fed, theta0, schedule, store = quadratic_setup(tmp_path, rounds=10, x_from=3)
    method = FedRecover(FedRecoverParams(warmup_rounds=3, correction_period=3, final_rounds=2,
                                         abnormality_threshold=math.inf))

    # Execute
    result = method.unlearn(request(store, fed, "x", tmp_path))

    # Assert
    expected = retrain(fed, theta0, schedule, "x")
    assert list(result.model) == list(theta0) and result.model["w"].dtype == np.float32
    for k in SHAPES:
        np.testing.assert_allclose(result.model[k], expected[k], atol=2e-5)
    assert [r for r, _ in fed.calls] == [4, 5, 8, 9, 10]
    assert all(clients == ("a", "b", "c") for _, clients in fed.calls)
    assert result.cost.client_epochs == 15  # against 30 for retraining rounds 3..10
    assert result.rounds_affected == list(range(3, 11))
    original = store.global_model(10)
    assert not np.allclose(original["w"], expected["w"], atol=1e-3)  # x did matter


def test_abnormal_estimate_triggers_an_exact_update_of_that_client(tmp_path: Path) -> None:
    # Prepare: c's targets are ~300 away, a's and b's ~1: c's updates are ~0.2 · 300, theirs
    # at most ~0.2 · 300/41 (c's FedAvg pull); τ = 10 lies between, so every estimate of c is
    # abnormal and none of a's or b's. No periodic correction.
    fed, _, _, store = quadratic_setup(tmp_path, rounds=8, x_from=1, big=True)
    method = FedRecover(FedRecoverParams(warmup_rounds=3, correction_period=0, final_rounds=1,
                                         abnormality_threshold=10.0))

    # Execute
    result = method.unlearn(request(store, fed, "x", tmp_path))

    # Assert: warm-up 2, 3 and final 8 ask everyone; rounds 4..7 ask c alone
    assert fed.calls == [(2, ("a", "b", "c")), (3, ("a", "b", "c")), (4, ("c",)),
                         (5, ("c",)), (6, ("c",)), (7, ("c",)), (8, ("a", "b", "c"))]
    assert any("4 abnormal" in note for note in result.notes)


def test_a_client_without_curvature_pairs_is_asked_for_its_exact_update(
    tmp_path: Path,
) -> None:
    # Prepare: b joins in round 6, after the warm-up (rounds 1..3) and without corrections:
    # it has no curvature pair in round 6 (asked alone), one from round 7 on (estimated).
    fed, theta0, schedule, store = quadratic_setup(tmp_path, rounds=8, x_from=1, b_from=6)
    method = FedRecover(FedRecoverParams(warmup_rounds=3, correction_period=0, final_rounds=1,
                                         abnormality_threshold=math.inf))

    # Execute
    result = method.unlearn(request(store, fed, "x", tmp_path))

    # Assert: still exact on isotropic quadratics
    assert fed.calls == [(2, ("a", "c")), (3, ("a", "c")), (6, ("b",)), (8, ("a", "b", "c"))]
    assert any("1 without curvature pairs" in note for note in result.notes)
    expected = retrain(fed, theta0, schedule, "x")
    for k in SHAPES:
        np.testing.assert_allclose(result.model[k], expected[k], atol=2e-5)


def test_refuses_a_history_missing_replayed_updates(tmp_path: Path) -> None:
    # Prepare: Δt = 2 keeps rounds 1 and 3 of 4; x takes part from round 1
    rng = np.random.default_rng(0)
    fed = QuadraticFederation({"a": (1.0, random_tensors(rng), 5),
                               "x": (1.0, random_tensors(rng), 5)})
    store = record_run(tmp_path / "run", fed, random_tensors(rng), [["a", "x"]] * 4,
                       retain_interval=2)
    fed.calls.clear()

    # Execute / Assert: refused up front, nothing asked of the clients
    with pytest.raises(RetentionError, match=r"dropped those of rounds 2, 4;"):
        FedRecover().unlearn(request(store, fed, "x", tmp_path))
    assert fed.calls == []


def test_a_client_that_never_took_part_leaves_the_model_unchanged(tmp_path: Path) -> None:
    fed, _, _, store = quadratic_setup(tmp_path, rounds=3, x_from=99)

    result = FedRecover().unlearn(request(store, fed, "x", tmp_path))

    for k in SHAPES:
        np.testing.assert_array_equal(result.model[k], store.global_model(3)[k])
    assert result.rounds_affected == [] and fed.calls == []


def test_parameters_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match=r"buffer-size = 0 is out of range; expected >= 1"):
        FedRecoverParams(buffer_size=0)
    with pytest.raises(ConfigError, match=r"tolerance-rate = 1.5 is out of range"):
        FedRecoverParams.from_mapping({"tolerance-rate": 1.5})
    with pytest.raises(ConfigError, match=r"warmup-rounds = 0"):
        FedRecoverParams.from_mapping({"warmup-rounds": 0})
    params = FedRecoverParams.from_mapping({"correction-period": 0, "final-rounds": 1})
    assert params.to_dict()["correction-period"] == 0
    assert METHODS["fedrecover"] is FedRecover


# --------------------------------------------------------------- with real training
class LocalFederation:
    """Trains the run's clients in-process as the ClientApp does (same data, model, seeds)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.cost = Cost()
        self.calls: list[tuple[int, tuple[str, ...]]] = []
        self.data = {f"client-{k:03d}": load_client_data(cfg, k)[0]
                     for k in range(cfg.num_clients)}

    @property
    def roster(self) -> tuple[str, ...]:
        return tuple(sorted(self.data))

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.calls.append((server_round, tuple(clients)))
        out = {}
        for cid in clients:
            model = load_tensors(new_model(self.cfg), global_model)
            epochs = local_epochs or self.cfg.local_epochs
            result = train_local(model, self.data[cid], epochs=epochs,
                                 learning_rate=self.cfg.learning_rate,
                                 batch_size=self.cfg.batch_size,
                                 seed=client_train_seed(self.cfg.seed, server_round, cid))
            out[cid] = ClientUpdate(cid, model_tensors(model), result.num_examples)
            self.cost.client_epochs += epochs
        return out

    def replay(self, **kwargs: Any) -> dict[str, np.ndarray]:
        raise AssertionError("not used")

    def evaluate_local(self, model: Any, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def test_exact_replay_on_a_real_run_equals_retraining(trained_run: Path, tmp_path: Path) -> None:
    # Prepare: a 3-round, 4-client run; a warm-up over every round makes FedRecover exact:
    # round 1 from the stored updates, rounds 2 and 3 trained by the three others.
    with HistoryStore.open(trained_run) as store:
        cfg = RunConfig.from_mapping(store.run_config)
        fed = LocalFederation(cfg)
        forget = "client-001"
        model = store.global_model(0)
        for t in range(1, store.last_round + 1):
            clients = [c for c in store.round(t).client_ids if c != forget]
            replies = fed.train(server_round=t, global_model=model, clients=clients)
            total = sum(r.num_examples for r in replies.values())
            model = {k: np.sum([replies[c].num_examples / total
                                * replies[c].local_model[k].astype(np.float64)
                                for c in clients], axis=0).astype(np.float32) for k in model}
        fed.calls.clear()
        fed.cost = Cost()

        # Execute
        result = FedRecover(FedRecoverParams(warmup_rounds=3)).unlearn(UnlearningRequest(
            store=store, forget=frozenset({forget}), federation=fed,
            workdir=str(tmp_path / "work")))

    # Assert
    for k in model:
        np.testing.assert_allclose(result.model[k], model[k], atol=1e-6)
    assert fed.calls == [(2, ("client-000", "client-002", "client-003"))] + [
        (3, ("client-000", "client-002", "client-003"))]
    assert result.cost.client_epochs == 6


def test_abnormality_threshold_over_updates_by_hand() -> None:
    # Round A: updates (1, -3), (2, 0.5): ∞-norms 3, 2; round B: (0.1, 0.2), (-4, 1): 0.2, 4
    rounds = [[np.array([1.0, -3.0]), np.array([2.0, 0.5])],
              [np.array([0.1, 0.2]), np.array([-4.0, 1.0])]]
    # α = 0.5 of 2 updates: the j = ceil(2 · 0.5) = 1st smallest: τ_A = 2, τ_B = 0.2 -> 2
    assert abnormality_threshold(rounds, 0.5, "updates") == 2.0
    # α = 0: the largest ∞-norm, max(3, 4) = 4
    assert abnormality_threshold(rounds, 0.0, "updates") == 4.0
    # over coordinates, α = 0.5 of 4: the 2nd smallest, A: 1, B: 0.2 -> 1
    assert abnormality_threshold(rounds, 0.5, "coordinates") == 1.0
    with pytest.raises(ConfigError, match="threshold-basis = 'x' is not allowed"):
        FedRecoverParams(threshold_basis="x")

"""Tests of PGA: the client's projected gradient ascent and the server's method."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforget.arrays import load_tensors, model_tensors
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset, load_dataset
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore, ParticipantUpdate
from fedforget.models import build_model
from fedforget.sampling import client_train_seed, derive_seed
from fedforget.task import load_client_data, load_test_set, new_model
from fedforget.tensors import decode
from fedforget.training import evaluate, train_local
from fedforget.unlearning.ascent import (
    TASK,
    AscentResult,
    ascent_config,
    ascent_kwargs,
    project_to_ball,
    projected_gradient_ascent,
)
from fedforget.unlearning.base import (
    METHODS,
    ClientUpdate,
    Cost,
    RetentionError,
    UnlearningError,
    UnlearningRequest,
)
from fedforget.unlearning.pga import PGA, PGAParams, derive_radius, reference_model
from fedforget.withdrawal import WithdrawalLedger

F32_EPS = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------- client side
@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    train, _ = load_dataset("synthetic", seed=0, num_samples=200, num_features=6, num_classes=3)
    return train.subset(np.arange(80))


def trained_logreg(data: ArrayDataset, seed: int = 0) -> torch.nn.Module:
    model = build_model("logreg", input_shape=data.input_shape, num_classes=data.num_classes,
                        seed=seed)
    train_local(model, data, epochs=5, learning_rate=0.5, batch_size=16, seed=1)
    return model


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def reference_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def dist(model: torch.nn.Module, reference: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((p.detach().double().numpy() - reference[n]) ** 2))
                         for n, p in model.named_parameters()))


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-3, 1e3),
    radius=st.floats(1e-4, 1e2),
)
def test_projection_lands_in_the_ball_and_keeps_the_direction(
    sizes: list[int], seed: int, scale: float, radius: float
) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(seed)
    centre = [torch.randn(n, generator=gen) for n in sizes]
    params = [c + scale * torch.randn(n, generator=gen) for c, n in zip(centre, sizes,
                                                                       strict=True)]
    before = [p.clone() for p in params]
    norm_before = math.sqrt(sum(float(((p - c).double() ** 2).sum())
                                for p, c in zip(before, centre, strict=True)))

    # Execute
    after = project_to_ball(params, centre, radius)

    # Assert: inside up to float32 rounding of the parameters; unchanged if it was inside
    centre_norm = math.sqrt(sum(float((c.double() ** 2).sum()) for c in centre))
    slack = 2 * F32_EPS * (centre_norm + radius)
    assert after <= radius + slack
    if norm_before <= radius:
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    else:
        moved = torch.cat([(p - c).double() for p, c in zip(params, centre, strict=True)])
        original = torch.cat([(b - c).double() for b, c in zip(before, centre, strict=True)])
        cosine = float(moved @ original) / (float(moved.norm()) * float(original.norm()))
        assert cosine > 1 - 1e-4


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 1000),
    offset=st.floats(0.0, 3.0),
    radius=st.floats(1e-3, 5.0),
    learning_rate=st.floats(1e-3, 10.0),
)
def test_ascent_never_leaves_the_ball(
    data: ArrayDataset, seed: int, offset: float, radius: float, learning_rate: float
) -> None:
    # Prepare: a random model, a reference shifted from it by a random offset
    model = build_model("logreg", input_shape=data.input_shape, num_classes=data.num_classes,
                        seed=seed)
    reference = {k: v + offset * np.sign(np.sin(np.arange(v.size).reshape(v.shape) + seed))
                 .astype(np.float32) for k, v in reference_of(model).items()}

    # Execute
    result = projected_gradient_ascent(
        model, data, reference=reference, radius=radius, epochs=1,
        learning_rate=learning_rate, batch_size=16, seed=seed, clip_grad_norm=None,
    )

    # Assert
    slack = 2 * F32_EPS * (math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                                         for v in reference.values())) + radius)
    assert dist(model, reference) <= radius + slack
    assert result.distance <= radius + slack
    assert result.steps == 5  # 80 examples in batches of 16


def test_ascent_increases_the_loss_on_the_clients_data(data: ArrayDataset) -> None:
    # Prepare
    model = trained_logreg(data)
    reference = reference_of(model)
    before = evaluate(model, data)

    # Execute
    result = projected_gradient_ascent(
        model, data, reference=reference, radius=2.0, epochs=2, learning_rate=3.0,
        batch_size=16, seed=3, clip_grad_norm=1.0,
    )

    # Assert
    after = evaluate(model, data)
    assert after.loss > 2 * before.loss
    assert result.loss == pytest.approx(after.loss)
    assert result.steps == 10 and not result.stopped_early
    assert 0 < result.distance <= 2.0 + 1e-5


def test_ascent_is_deterministic_given_the_seed(data: ArrayDataset) -> None:
    # Prepare
    models = [trained_logreg(data) for _ in range(3)]
    reference = reference_of(models[0])
    args: dict[str, Any] = {"reference": reference, "radius": 10.0, "epochs": 2,
                            "learning_rate": 0.05, "batch_size": 7, "clip_grad_norm": 0.5}

    # Execute: the global RNG must not matter, the seed must
    torch.manual_seed(1)
    projected_gradient_ascent(models[0], data, seed=5, **args)
    torch.manual_seed(2)
    projected_gradient_ascent(models[1], data, seed=5, **args)
    projected_gradient_ascent(models[2], data, seed=6, **args)

    # Assert
    assert torch.equal(flat(models[0]), flat(models[1]))
    assert not torch.equal(flat(models[0]), flat(models[2]))


def test_ascent_stops_early_below_the_minimal_accuracy(data: ArrayDataset) -> None:
    # Prepare
    model = trained_logreg(data)
    start = evaluate(model, data).accuracy
    reference = reference_of(model)

    untrained = build_model("logreg", input_shape=data.input_shape,
                            num_classes=data.num_classes, seed=0)
    assert evaluate(untrained, data).accuracy < 1.0

    # Execute: an untrained model is below 1.0 already: no step is taken; a trained one
    # just above the threshold takes a few
    never = projected_gradient_ascent(
        untrained, data, reference=reference, radius=5.0, epochs=3,
        learning_rate=1.0, batch_size=8, seed=0, min_accuracy=1.0,
    )
    some = projected_gradient_ascent(
        model, data, reference=reference, radius=5.0, epochs=3, learning_rate=1.0,
        batch_size=8, seed=0, min_accuracy=start - 0.05,
    )

    # Assert
    assert never.steps == 0 and never.stopped_early
    assert some.stopped_early and 1 <= some.steps < 30
    assert some.accuracy < start - 0.05


def test_config_keys_round_trip_and_errors_name_the_key() -> None:
    # Prepare
    config = {"local-epochs": 2, "batch-size": 8, "fedforget.seed": 3, "learning-rate": 0.1,
              **ascent_config(radius=1.5, learning_rate=0.02, clip_grad_norm=0.0,
                              min_accuracy=0.4)}

    # Execute
    kwargs = ascent_kwargs(config)

    # Assert
    assert kwargs == {"radius": 1.5, "epochs": 2, "learning_rate": 0.02, "batch_size": 8,
                      "seed": 3, "clip_grad_norm": None, "min_accuracy": 0.4,
                      "momentum": 0.0, "stop_distance": None, "anchor": None}
    anchored = ascent_kwargs({**config, **ascent_config(
        radius=1.5, learning_rate=0.02, clip_grad_norm=0.0, min_accuracy=0.0, momentum=0.9,
        stop_distance=0.7, anchor={"w": np.array([1.0, -2.0], np.float32)})})
    assert anchored["momentum"] == 0.9 and anchored["stop_distance"] == 0.7
    np.testing.assert_array_equal(anchored["anchor"]["w"], [1.0, -2.0])
    with pytest.raises(ConfigError, match="pga-stop-distance = 0.7 with no anchor model"):
        ascent_config(radius=1.0, learning_rate=0.1, clip_grad_norm=0, min_accuracy=0,
                      stop_distance=0.7)
    with pytest.raises(ConfigError, match="pga-radius = None"):
        ascent_kwargs({k: v for k, v in config.items() if k != "pga-radius"})
    with pytest.raises(ConfigError, match=r"pga-radius = -1\.0 is out of range"):
        projected_gradient_ascent(torch.nn.Linear(2, 2), ArrayDataset(
            np.zeros((1, 2)), np.zeros(1, dtype=np.int64), 2, "x"),
            reference={}, **{**kwargs, "radius": -1.0})
    metrics = AscentResult(num_examples=4, loss=1.0, steps=2, stopped_early=True,
                           distance=0.5).metrics()
    assert metrics == {"num-examples": 4, "train-loss": 1.0, "pga-steps": 2,
                       "pga-stopped-early": 1, "pga-distance": 0.5}


# ------------------------------------------------------------------- server side
class ScriptedFederation:
    """Replies to "pga" with ``pga_offset`` added to the reference, and to "train" with
    each client's fixed ``deltas`` added to the global model."""

    def __init__(self, roster: Sequence[str], deltas: Mapping[str, tuple[np.ndarray, int]],
                 pga_offset: np.ndarray) -> None:
        self._roster = tuple(sorted(roster))
        self.deltas = dict(deltas)
        self.pga_offset = pga_offset
        self.cost = Cost()
        self.calls: list[dict[str, Any]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return self._roster

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.calls.append({"round": server_round, "clients": tuple(clients), "task": task,
                           "epochs": local_epochs, "config": dict(extra_config or {}),
                           "model": {k: v.copy() for k, v in global_model.items()}})
        self.cost.client_epochs += len(clients) * (local_epochs or 1)
        if task == "pga":
            return {c: ClientUpdate(c, {"w": global_model["w"] + self.pga_offset}, 4,
                                    {"pga-steps": 3.0, "train-loss": 2.0})
                    for c in clients}
        return {c: ClientUpdate(c, {"w": global_model["w"] + self.deltas[c][0]},
                                self.deltas[c][1]) for c in clients}

    def replay(self, **kwargs: Any) -> dict[str, np.ndarray]:
        raise AssertionError("not used")

    def evaluate_local(self, model: Any, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def tiny_store(path: Path, *, retain_interval: int = 1,
               last_round_clients: tuple[str, ...] = ("a", "b", "u")) -> HistoryStore:
    """θ_0 = (0, 0); round 1: a, b, u; round 2 (T): ``last_round_clients`` with
    Δa = (1, 0), Δb = (0, 2), Δu = (5, 5) and n = 1, 3, 4."""
    store = HistoryStore.create(path, run_config={"seed": 0, "num-clients": 3},
                                retain_interval=retain_interval, fsync=False)
    store.put_initial_model({"w": vec(0, 0)})
    n = {"a": 1, "b": 3, "u": 4}
    updates = {"a": vec(1, 0), "b": vec(0, 2), "u": vec(5, 5)}
    model = vec(0, 0)
    for t, clients in ((1, ("a", "b", "u")), (2, last_round_clients)):
        total = sum(n[c] for c in clients)
        new = model + sum(n[c] / total * updates[c] for c in clients)
        store.commit_round(
            round=t, global_before=store.model_digest(t - 1), global_after={"w": new},
            participants=[ParticipantUpdate(client_id=c, num_examples=n[c], weight=n[c] / total,
                                            seed=t, update={"w": updates[c]}) for c in clients],
            config={},
        )
        model = new
    return store


def test_reference_model_by_hand(tmp_path: Path) -> None:
    # Prepare: θ_1 = (1·(1,0) + 3·(0,2) + 4·(5,5)) / 8 = (21/8, 26/8)
    store = tiny_store(tmp_path / "run")
    theta1 = np.array([21 / 8, 26 / 8])

    # Execute
    ref = reference_model(store, "u")
    ref_b = reference_model(store, "b")
    shifted = reference_model(store, "u", current={"w": store.global_model(2)["w"] + 1})

    # Assert: w_ref = θ_1 + (1·(1,0) + 3·(0,2)) / 4 = θ_1 + (0.25, 1.5)
    np.testing.assert_allclose(ref["w"], theta1 + [0.25, 1.5], rtol=1e-6)
    np.testing.assert_allclose(ref_b["w"], theta1 + np.array([1, 0]) / 5 + [4, 4], rtol=1e-6)
    np.testing.assert_allclose(shifted["w"], theta1 + [1.25, 2.5], rtol=1e-6)
    assert ref["w"].dtype == np.float32


def test_reference_when_the_client_skipped_the_last_round(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "run", last_round_clients=("a", "b"))
    np.testing.assert_array_equal(reference_model(store, "u")["w"], store.global_model(2)["w"])


def test_ascent_asked_of_the_client_then_post_rounds_of_the_others(tmp_path: Path) -> None:
    # Prepare: radius 1, the client moves (0.3, 0.4) (inside); post rounds: a adds (1, 1)
    # with n = 1, b adds (3, -1) with n = 3: each round adds (1·(1,1) + 3·(3,-1))/4 = (2.5, -0.5)
    store = tiny_store(tmp_path / "run")
    fed = ScriptedFederation(["a", "b", "u"], {"a": (vec(1, 1), 1), "b": (vec(3, -1), 3)},
                             pga_offset=vec(0.3, 0.4))
    method = PGA(PGAParams(radius=1.0, ascent_epochs=2, ascent_learning_rate=0.05,
                           post_rounds=2))
    w_ref = np.array([21 / 8 + 0.25, 26 / 8 + 1.5])
    # u's last local model (round 2): θ_1 + Δu = (21/8 + 5, 26/8 + 5); τ = 0.5 × δ = 0.5

    # Execute
    result = method.unlearn(UnlearningRequest(store=store, forget=frozenset({"u"}),
                                              federation=fed, workdir=str(tmp_path / "w")))

    # Assert
    assert [(c["round"], c["clients"], c["task"], c["epochs"]) for c in fed.calls] == [
        (3, ("u",), "pga", 2), (3, ("a", "b"), "train", None), (4, ("a", "b"), "train", None)]
    config = dict(fed.calls[0]["config"])
    anchor = decode(config.pop("pga-anchor"))
    assert config == {"pga-radius": 1.0, "pga-learning-rate": 0.05, "pga-clip-grad-norm": 5.0,
                      "pga-min-accuracy": 0.0, "pga-momentum": 0.9, "pga-stop-distance": 0.5}
    np.testing.assert_allclose(anchor["w"], [21 / 8 + 5, 26 / 8 + 5], rtol=1e-6)
    np.testing.assert_allclose(fed.calls[0]["model"]["w"], w_ref, rtol=1e-6)
    np.testing.assert_allclose(result.model["w"], w_ref + [0.3, 0.4] + [5.0, -1.0], rtol=1e-6)
    assert result.model["w"].dtype == np.float32
    assert result.rounds_affected == [1, 2]
    assert result.cost.client_epochs == 2 + 2 + 2


def test_post_rounds_never_ask_a_client_that_withdrew_before(tmp_path: Path) -> None:
    # Prepare: a withdrew earlier (its request is in the run's ledger); now u leaves
    store = tiny_store(tmp_path / "run")
    with WithdrawalLedger(store.directory) as ledger:
        ledger.request("a", reason="earlier", roster={"a", "b", "u"})
    fed = ScriptedFederation(["a", "b", "u"], {"b": (vec(3, -1), 3)}, pga_offset=vec(0, 0))

    # Execute
    PGA(PGAParams(radius=1.0, post_rounds=1)).unlearn(UnlearningRequest(
        store=store, forget=frozenset({"u"}), federation=fed, workdir=str(tmp_path / "w")))

    # Assert
    assert [(c["round"], c["clients"]) for c in fed.calls] == [(3, ("u",)), (3, ("b",))]


def test_the_server_projects_a_reply_outside_the_ball(tmp_path: Path) -> None:
    # Prepare: the client moves (3, 4), length 5, with radius 1: back to (0.6, 0.8)
    store = tiny_store(tmp_path / "run")
    fed = ScriptedFederation(["a", "b", "u"], {}, pga_offset=vec(3, 4))

    # Execute
    result = PGA(PGAParams(radius=1.0, post_rounds=0)).unlearn(UnlearningRequest(
        store=store, forget=frozenset({"u"}), federation=fed, workdir=str(tmp_path / "w")))

    # Assert
    np.testing.assert_allclose(result.model["w"], [21 / 8 + 0.85, 26 / 8 + 2.3], rtol=1e-6)
    assert any("outside the ball" in note for note in result.notes)


def test_refusals_before_any_work(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "run")
    fed = ScriptedFederation(["a", "b"], {}, pga_offset=vec(0, 0))

    def ask(forget: set[str], on: HistoryStore = store) -> None:
        PGA(PGAParams(radius=1.0)).unlearn(UnlearningRequest(
            store=on, forget=frozenset(forget), federation=fed, workdir=str(tmp_path / "w")))

    with pytest.raises(UnlearningError, match="'u' is not in the federation's roster"):
        ask({"u"})
    with pytest.raises(UnlearningError, match="one client per request"):
        ask({"a", "b"})
    with pytest.raises(UnlearningError, match="exactly one client per request; got none"):
        ask(set())
    # Δt = 2 keeps rounds 1, 3, ...: the last round 2 is not retained
    with pytest.raises(RetentionError, match="last round 2, but retain_interval 2"):
        ask({"a"}, tiny_store(tmp_path / "run2", retain_interval=2))
    assert fed.calls == []


def test_derived_radius_is_the_root_of_a_third_of_the_mean_squared_distance() -> None:
    # Prepare
    cfg = RunConfig.from_mapping({"seed": 4, "dataset": "synthetic", "model": "logreg",
                                  "synthetic-samples": 60})
    test = load_test_set(cfg)
    reference = {k: np.zeros_like(v) for k, v in model_tensors(build_model(
        "logreg", input_shape=test.input_shape, num_classes=test.num_classes, seed=0)).items()}
    norms = []
    for i in range(10):
        init = model_tensors(build_model("logreg", input_shape=test.input_shape,
                                         num_classes=test.num_classes,
                                         seed=derive_seed(4, "pga-radius", i)))
        norms.append(math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                                   for v in init.values())))

    # Execute / Assert: the authors' sqrt(mean ||w_ref - w_rand||^2 / 3)
    expected = math.sqrt(np.mean(np.square(norms)) / 3)
    assert derive_radius(reference, cfg) == pytest.approx(expected, rel=1e-12)


def test_parameters_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match=r"ascent-epochs = 0 is out of range; expected >= 1"):
        PGAParams(ascent_epochs=0)
    with pytest.raises(ConfigError, match=r"radius = inf is out of range"):
        PGAParams.from_mapping({"radius": math.inf})
    with pytest.raises(ConfigError, match=r"ascent-learning-rate = 0.0 is out of range"):
        PGAParams.from_mapping({"ascent-learning-rate": 0})
    params = PGAParams.from_mapping({"post-rounds": 0, "radius": 2})
    assert isinstance(params, PGAParams) and params.post_rounds == 0 and params.radius == 2.0
    assert METHODS["pga"] is PGA and not PGA.multi_client


# --------------------------------------------------------------- with real training
class LocalFederation:
    """Runs the run's clients in-process as the ClientApp would: "train" with train_local,
    "pga" with projected_gradient_ascent from the message's arrays and config keys."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.cost = Cost()
        self.calls: list[tuple[int, tuple[str, ...], str]] = []
        self.replies: dict[str, dict[str, float | int]] = {}

    @property
    def roster(self) -> tuple[str, ...]:
        return tuple(f"client-{k:03d}" for k in range(self.cfg.num_clients))

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.calls.append((server_round, tuple(clients), task))
        out = {}
        for cid in clients:
            train, holdout = load_client_data(self.cfg, int(cid.split("-")[1]))
            model = load_tensors(new_model(self.cfg), global_model)
            config = {"task": task, "local-epochs": local_epochs or self.cfg.local_epochs,
                      "learning-rate": self.cfg.learning_rate, "batch-size": self.cfg.batch_size,
                      "fedforget.seed": client_train_seed(self.cfg.seed, server_round, cid),
                      **(extra_config or {})}
            if task == TASK:
                result = projected_gradient_ascent(
                    model, train, reference=global_model,
                    validation=holdout if len(holdout) else None, **ascent_kwargs(config))
                metrics = result.metrics()
                self.replies[cid] = metrics
            else:
                trained = train_local(model, train, epochs=config["local-epochs"],
                                      learning_rate=config["learning-rate"],
                                      batch_size=config["batch-size"],
                                      seed=config["fedforget.seed"])
                metrics = {"num-examples": trained.num_examples, "train-loss": trained.loss}
            out[cid] = ClientUpdate(cid, model_tensors(model), len(train), metrics)
            self.cost.client_epochs += config["local-epochs"]
        return out

    def replay(self, **kwargs: Any) -> dict[str, np.ndarray]:
        raise AssertionError("not used")

    def evaluate_local(self, model: Any, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def test_pga_on_a_real_run_with_a_derived_radius(trained_run: Path, tmp_path: Path) -> None:
    # Prepare: the 3-round, 4-client run; client-002 leaves
    with HistoryStore.open(trained_run) as store:
        cfg = RunConfig.from_mapping(store.run_config)
        fed = LocalFederation(cfg)
        w_ref = reference_model(store, "client-002")
        radius = derive_radius(w_ref, cfg)
        train, _ = load_client_data(cfg, 2)
        loss_ref = evaluate(load_tensors(new_model(cfg), w_ref), train).loss

        # Execute
        result = PGA(PGAParams(ascent_epochs=2, ascent_learning_rate=0.5, post_rounds=1)).unlearn(
            UnlearningRequest(store=store, forget=frozenset({"client-002"}), federation=fed,
                              workdir=str(tmp_path / "work")))

    # Assert: the ascent raised the client's loss within the derived ball, then one round
    others = ("client-000", "client-001", "client-003")
    assert fed.calls == [(4, ("client-002",), "pga"), (4, others, "train")]
    metrics = fed.replies["client-002"]
    assert radius > 0 and 0 < float(metrics["pga-distance"]) <= radius * (1 + 1e-5)
    assert float(metrics["train-loss"]) > loss_ref
    assert any("mean squared distance to 10 random initialisations" in note
               for note in result.notes)
    assert result.cost.client_epochs == 2 + 3


def test_post_rounds_leave_out_the_requests_excluded_clients(tmp_path: Path) -> None:
    # Prepare: the service names a (a pending withdrawal, not in the ledger here) in exclude
    store = tiny_store(tmp_path / "run")
    fed = ScriptedFederation(["a", "b", "u"], {"b": (vec(3, -1), 3)}, pga_offset=vec(0, 0))

    # Execute
    PGA(PGAParams(radius=1.0, post_rounds=2)).unlearn(UnlearningRequest(
        store=store, forget=frozenset({"u"}), federation=fed, workdir=str(tmp_path / "w"),
        exclude=frozenset({"a", "u"})))

    # Assert
    assert [(c["round"], c["clients"]) for c in fed.calls] == [
        (3, ("u",)), (3, ("b",)), (4, ("b",))]


def test_the_distance_stop_ends_the_ascent_once_far_from_the_anchor(data: ArrayDataset) -> None:
    # Prepare: the anchor is the starting model itself, so the distance to it grows from 0;
    # a stop distance of 0.05 inside a radius of 5 must stop the ascent early
    model = trained_logreg(data)
    reference = reference_of(model)

    # Execute
    stopped = projected_gradient_ascent(
        model, data, reference=reference, radius=5.0, epochs=3, learning_rate=0.5,
        batch_size=16, seed=0, momentum=0.9, stop_distance=0.05, anchor=reference)

    # Assert: it stopped on the first step beyond 0.05 from the anchor, well before 15 steps
    assert stopped.stop_reason == "distance" and stopped.stopped_early
    assert 1 <= stopped.steps < 15
    assert stopped.anchor_distance > 0.05
    assert stopped.anchor_distance == pytest.approx(stopped.distance, rel=1e-6)  # anchor = ref


def test_radius_falls_back_to_the_initial_model_when_the_runs_model_cannot_be_built(
    tmp_path: Path,
) -> None:
    # Prepare: the tiny history's tensors ({"w"}) are not the run config's model's, as for a
    # user's app; θ_0 = (0, 0) stands in for the random initialisations:
    # δ = sqrt(|w_ref - θ_0|² / 3), w_ref = (2.875, 4.75): |w_ref|² = 8.265625 + 22.5625
    store = tiny_store(tmp_path / "run")
    fed = ScriptedFederation(["a", "b", "u"], {}, pga_offset=vec(0, 0))

    # Execute
    result = PGA(PGAParams(post_rounds=0)).unlearn(UnlearningRequest(
        store=store, forget=frozenset({"u"}), federation=fed, workdir=str(tmp_path / "w")))

    # Assert
    assert fed.calls[0]["config"]["pga-radius"] == pytest.approx(math.sqrt(30.828125 / 3))
    assert any("θ_0 stands in for the random initialisations" in n for n in result.notes)

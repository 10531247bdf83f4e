"""Subtract: server-side removal of the forgotten clients' weighted contributions."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from history_builders import Tensors, tensors
from history_builders import build_store as _build_store

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.unlearning import METHODS, get_method
from fedforget.unlearning.base import (
    ClientUpdate,
    Cost,
    RetentionError,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
)
from fedforget.unlearning.subtract import Subtract, SubtractParams, removal_residual

Round = dict[str, tuple[int, dict[str, list[Any]]]]  # client id -> (n_k, update)



def build_store(path: Path, theta0: Tensors, rounds: Sequence[Any], **kw: Any) -> HistoryStore:
    """A FedAvg history (``local-epochs`` 3 unless given)."""
    kw.setdefault("local_epochs", 3)
    return _build_store(path, theta0, rounds, **kw)


class RepairFederation:
    """Records training requests; each client returns ``sent + shift[cid]``."""

    def __init__(self, shift: Mapping[str, float], examples: Mapping[str, int]) -> None:
        self.cost = Cost()
        self.shift = dict(shift)
        self.examples = dict(examples)
        self.calls: list[dict[str, Any]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return tuple(sorted(self.examples))

    def replay(self, **kwargs: Any) -> Tensors:
        raise AssertionError("subtract must not replay rounds")

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.calls.append({"server_round": server_round, "clients": list(clients),
                           "local_epochs": local_epochs,
                           "global_model": {k: v.copy() for k, v in global_model.items()}})
        self.cost.client_epochs += len(clients) * (local_epochs or 0)
        return {
            cid: ClientUpdate(cid, {k: (v + self.shift[cid]).astype(np.float32)
                                    for k, v in global_model.items()}, self.examples[cid])
            for cid in clients
        }

    def evaluate_local(self, model: Tensors, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def request(store: HistoryStore, forget: set[str], federation: Any, tmp_path: Path,
            current: Tensors | None = None) -> UnlearningRequest:
    return UnlearningRequest(store=store, forget=frozenset(forget), federation=federation,
                             workdir=str(tmp_path / "work"), current_model=current)


def run(params: Mapping[str, Any], req: UnlearningRequest) -> UnlearningResult:
    return get_method("subtract", params).unlearn(req)


# A 3-round history with clients a, b and u (the one to forget), worked out by hand.
#   θ_0 = w [1, 2], b [[0, 0]]
#   round 1: a (n=1) w [4, 0] b [[2, 2]];  b (n=1) w [0, 4] b [[-2, 2]];
#            u (n=2) w [8, 8] b [[4, 4]]
#            weights 1/4, 1/4, 1/2 -> g_1 = w [5, 5], b [[2, 3]]
#   round 2: a (n=1) w [2, 2] b [[0, 4]];  u (n=3) w [4, 0] b [[4, 0]]
#            weights 1/4, 3/4 -> g_2 = w [3.5, 0.5], b [[3, 1]]
#   round 3: a (n=2) w [1, 0] b [[0, 0]];  b (n=2) w [0, 1] b [[2, 2]]
#            weights 1/2, 1/2 -> g_3 = w [0.5, 0.5], b [[1, 1]]
#   θ_3 = w [10, 8], b [[6, 5]]
THETA0 = tensors([1, 2], [[0, 0]])
ROUNDS: list[Round] = [
    {"a": (1, {"w": [4, 0], "b": [[2, 2]]}), "b": (1, {"w": [0, 4], "b": [[-2, 2]]}),
     "u": (2, {"w": [8, 8], "b": [[4, 4]]})},
    {"a": (1, {"w": [2, 2], "b": [[0, 4]]}), "u": (3, {"w": [4, 0], "b": [[4, 0]]})},
    {"a": (2, {"w": [1, 0], "b": [[0, 0]]}), "b": (2, {"w": [0, 1], "b": [[2, 2]]})},
]
# Without u: round 1 -> a, b at 1/2 each: w [2, 2], b [[0, 2]]; round 2 -> a alone:
# w [2, 2], b [[0, 4]]; round 3 unchanged: w [0.5, 0.5], b [[1, 1]].
# θ~ = θ_0 + those = w [1+2+2+0.5, 2+2+2+0.5] = [5.5, 6.5], b [[0+0+0+1, 0+2+4+1]] = [[1, 7]]
EXPECTED = tensors([5.5, 6.5], [[1, 7]])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with build_store(tmp_path / "run", THETA0, ROUNDS) as s:
        yield s


def assert_tensors(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == np.float32
        np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-6)


def test_registered_under_its_name() -> None:
    assert METHODS["subtract"] is Subtract


def test_the_store_is_what_the_comment_says(store: HistoryStore) -> None:
    assert_tensors(store.global_model(3), tensors([10, 8], [[6, 5]]))


def test_removal_from_the_final_model_matches_the_hand_computed_rule(
    store: HistoryStore, tmp_path: Path
) -> None:
    # Prepare
    federation = RepairFederation({}, {"a": 1, "b": 1, "u": 1})
    # Execute
    result = run({}, request(store, {"u"}, federation, tmp_path))
    # Assert
    assert_tensors(result.model, EXPECTED)
    assert result.rounds_affected == [1, 2]
    assert federation.calls == []
    assert result.cost.client_epochs == 0 and result.cost.rounds == 0


def test_residual_of_a_round_by_hand(store: HistoryStore) -> None:
    # r_1 = (a, b at 1/2) - g_1 = w [2-5, 2-5], b [[0-2, 2-3]]
    r1 = removal_residual(store, 1, frozenset({"u"}))
    np.testing.assert_allclose(r1["w"], [-3, -3], atol=1e-12)
    np.testing.assert_allclose(r1["b"], [[-2, -1]], atol=1e-12)
    # Round 3 had no forgotten client: nothing changes.
    r3 = removal_residual(store, 3, frozenset({"u"}))
    assert all(not np.any(v) for v in r3.values())


def test_forgetting_a_client_who_never_took_part_changes_nothing(
    store: HistoryStore, tmp_path: Path
) -> None:
    federation = RepairFederation({}, {"a": 1})
    result = run({"repair-rounds": 2}, request(store, {"nobody"}, federation, tmp_path))
    assert_tensors(result.model, store.global_model(3))
    assert result.rounds_affected == []
    assert federation.calls == []


def test_a_round_of_only_the_forgotten_client_contributes_nothing(tmp_path: Path) -> None:
    # Prepare: round 2 had u alone.
    #   θ_0 = w [0, 0], b [[0, 0]]
    #   round 1: a (n=1) w [2, 0] b [[0, 2]]; u (n=1) w [6, 6] b [[6, 6]] -> a alone w/o u
    #   round 2: u (n=5) w [9, 9] b [[9, 9]]                              -> nothing w/o u
    #   round 3: a (n=1) w [1, 1] b [[1, 0]]; u (n=3) w [4, 4] b [[4, 4]] -> a alone w/o u
    # θ~ = w [2+0+1, 0+0+1] = [3, 1], b [[0+0+1, 2+0+0]] = [[1, 2]]
    rounds: list[Round] = [
        {"a": (1, {"w": [2, 0], "b": [[0, 2]]}), "u": (1, {"w": [6, 6], "b": [[6, 6]]})},
        {"u": (5, {"w": [9, 9], "b": [[9, 9]]})},
        {"a": (1, {"w": [1, 1], "b": [[1, 0]]}), "u": (3, {"w": [4, 4], "b": [[4, 4]]})},
    ]
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), rounds) as store:
        # Execute
        result = run({}, request(store, {"u"}, RepairFederation({}, {"a": 1}), tmp_path))
    # Assert
    assert_tensors(result.model, tensors([3, 1], [[1, 2]]))
    assert result.rounds_affected == [1, 2, 3]


def test_the_model_in_service_is_not_corrected_twice(store: HistoryStore, tmp_path: Path) -> None:
    # The forget set is cumulative, so the result is rebuilt from θ_T whatever model an
    # earlier withdrawal left in service.
    current = tensors([0, 0], [[0, 0]])
    result = run({}, request(store, {"u"}, RepairFederation({}, {"a": 1}), tmp_path, current))
    assert_tensors(result.model, EXPECTED)


def test_a_client_only_in_retained_rounds_is_served_with_a_retain_interval(
    tmp_path: Path,
) -> None:
    # Prepare: Δt = 2 keeps rounds 1 and 3; u took part in those only.
    #   round 1: a (n=1) w [2, 2] b [[2, 0]]; u (n=1) w [4, 0] b [[0, 4]] -> a alone w/o u
    #   round 2: a (n=1) w [1, 0] b [[0, 1]]                              -> unchanged
    #   round 3: a (n=3) w [4, 0] b [[0, 0]]; u (n=1) w [0, 8] b [[8, 8]] -> a alone w/o u
    # θ~ = w [2+1+4, 2+0+0] = [7, 2], b [[2+0+0, 0+1+0]] = [[2, 1]]
    rounds: list[Round] = [
        {"a": (1, {"w": [2, 2], "b": [[2, 0]]}), "u": (1, {"w": [4, 0], "b": [[0, 4]]})},
        {"a": (1, {"w": [1, 0], "b": [[0, 1]]})},
        {"a": (3, {"w": [4, 0], "b": [[0, 0]]}), "u": (1, {"w": [0, 8], "b": [[8, 8]]})},
    ]
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), rounds,
                     retain_interval=2) as store:
        result = run({}, request(store, {"u"}, RepairFederation({}, {"a": 1}), tmp_path))
    assert_tensors(result.model, tensors([7, 2], [[2, 1]]))
    assert result.rounds_affected == [1, 3]


def test_a_contribution_in_a_round_not_retained_is_refused_up_front(tmp_path: Path) -> None:
    # Prepare: Δt = 2 keeps rounds 1 and 3, but u took part in round 2.
    rounds: list[Round] = [
        {"a": (1, {"w": [2, 2], "b": [[2, 0]]})},
        {"a": (1, {"w": [1, 0], "b": [[0, 1]]}), "u": (1, {"w": [4, 0], "b": [[0, 4]]})},
        {"a": (1, {"w": [4, 0], "b": [[0, 0]]})},
    ]
    federation = RepairFederation({"a": 0.0}, {"a": 1})
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), rounds,
                     retain_interval=2) as store:
        message = (
            "subtract needs the stored client updates of every round a forgotten client "
            "took part in ([2]); the history keeps them only every 2 rounds (1, 3, 5, ...), "
            "so rounds [2] are missing; record with retain-interval 1, or use an exact "
            "method (retrain, rollback)"
        )
        with pytest.raises(RetentionError, match=re.escape(message)):
            run({"repair-rounds": 1}, request(store, {"u"}, federation, tmp_path))
    assert federation.calls == []  # refused before any work


def test_repair_runs_ordinary_rounds_with_the_remaining_clients(
    store: HistoryStore, tmp_path: Path
) -> None:
    # Prepare: a (n=1) returns sent + 4, b (n=3) returns sent + 0, u must not be asked.
    # Each repair round moves every entry by (1·4 + 3·0)/4 = 1.
    federation = RepairFederation({"a": 4.0, "b": 0.0}, {"a": 1, "b": 3, "u": 2})
    # Execute
    result = run({"repair-rounds": 2}, request(store, {"u"}, federation, tmp_path))
    # Assert: rounds T+1, T+2; the run's 3 local epochs; first from θ~, then θ~ + 1.
    assert [c["server_round"] for c in federation.calls] == [4, 5]
    assert [c["clients"] for c in federation.calls] == [["a", "b"], ["a", "b"]]
    assert [c["local_epochs"] for c in federation.calls] == [3, 3]
    assert_tensors(federation.calls[0]["global_model"], EXPECTED)
    assert_tensors(federation.calls[1]["global_model"], tensors([6.5, 7.5], [[2, 8]]))
    assert_tensors(result.model, tensors([7.5, 8.5], [[3, 9]]))
    assert result.cost.client_epochs == 2 * 2 * 3


def test_repair_epochs_override_the_runs(store: HistoryStore, tmp_path: Path) -> None:
    federation = RepairFederation({"a": 0.0, "b": 0.0}, {"a": 1, "b": 1, "u": 1})
    run({"repair-rounds": 1, "repair-epochs": 5}, request(store, {"u"}, federation, tmp_path))
    assert [c["local_epochs"] for c in federation.calls] == [5]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"repair-rounds": -1}, "repair-rounds = -1 is out of range; expected >= 0"),
        ({"repair-epochs": -2}, "repair-epochs = -2 is out of range; expected >= 0"),
        ({"repair-rounds": 1.5}, "repair-rounds = 1.5: expected an integer"),
        ({"rounds": 1}, "unknown parameter 'rounds'; allowed: repair-rounds, repair-epochs"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("subtract", params)


def test_params_defaults() -> None:
    assert SubtractParams().to_dict() == {"repair-rounds": 0, "repair-epochs": 0,
                                          "shortcut": "auto"}


def test_a_bad_shortcut_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "shortcut = 'maybe'; expected one of auto, on, off")):
        get_method("subtract", {"shortcut": "maybe"})


# ------------------------------------------------------------ the weighted-mean shortcut
def test_the_shortcut_gives_the_hand_computed_model(tmp_path: Path) -> None:
    # Prepare: the history of the other tests, recorded as aggregated by a weighted mean
    # (as fedforget's strategy wrapper records for FedAvg and FedProx). Round 1,
    # c = (1 - 1/2) / (1/2) = 1:
    #   r_1 = 1·(g_1) - 2·(u's part 1/2·[8, 8], [[4, 4]]) = w [5-8, 5-8], b [[2-4, 3-4]]
    #       = w [-3, -3], b [[-2, -1]]  (as test_residual_of_a_round_by_hand)
    with build_store(tmp_path / "run", THETA0, ROUNDS,
                     recording={"aggregation": "weighted-mean"}) as store:
        _check_the_shortcut(store, tmp_path)


def _check_the_shortcut(store: HistoryStore, tmp_path: Path) -> None:
    r1 = removal_residual(store, 1, frozenset({"u"}))
    np.testing.assert_allclose(r1["w"], [-3, -3], atol=1e-12)
    np.testing.assert_allclose(r1["b"], [[-2, -1]], atol=1e-12)
    # Execute
    result = run({}, request(store, {"u"}, RepairFederation({}, {"a": 1}), tmp_path))
    # Assert: the same model as the general rule, from fewer blobs.
    assert_tensors(result.model, EXPECTED)
    assert any("weighted-mean shortcut" in n for n in result.notes)


def test_shortcut_on_is_refused_where_the_aggregation_is_unknown(
    store: HistoryStore, tmp_path: Path
) -> None:
    with pytest.raises(UnlearningError, match="shortcut = on needs a history"):
        run({"shortcut": "on"}, request(store, {"u"}, RepairFederation({}, {}), tmp_path))


def _random_fedavg_store(path: Path, *, codec: str, seed: int) -> HistoryStore:
    """A 6-round FedAvg history of 5 clients over a 3-tensor model (one of them int64),
    aggregated in float32 as the engine does: θ_t = Σ_k (n_k/N)·θ_{t,k}."""
    rng = np.random.default_rng(seed)
    store = HistoryStore.create(path, run_config={"local-epochs": 1}, codec=codec,
                                fsync=False)
    store.set_recording({"aggregation": "weighted-mean"})
    theta = {"w": rng.standard_normal((40, 30)).astype(np.float32),
             "steps": np.array([7], dtype=np.int64),
             "b": rng.standard_normal(30).astype(np.float32)}
    digest = store.put_initial_model(theta)
    from fedforget.history import ParticipantUpdate

    for t in range(1, 7):
        clients = sorted(rng.choice(["a", "b", "c", "d", "u"], size=3, replace=False))
        if t in (2, 5) and "u" not in clients:
            clients = sorted([*clients[:2], "u"])
        counts = {c: int(rng.integers(5, 50)) for c in clients}
        total = sum(counts.values())
        locals_ = {c: {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                       if v.dtype.kind == "f" else v for k, v in theta.items()}
                   for c in clients}
        after: dict[str, np.ndarray] = {}
        for c in clients:
            for k, v in locals_[c].items():
                if v.dtype.kind != "f":
                    after[k] = v
                elif k in after:
                    after[k] += v * (counts[c] / total)
                else:
                    after[k] = v * (counts[c] / total)
        participants = [
            ParticipantUpdate(client_id=c, num_examples=counts[c], weight=counts[c] / total,
                              seed=t, update={k: locals_[c][k] - theta[k] for k in theta})
            for c in clients
        ]
        record = store.commit_round(round=t, global_before=digest, global_after=after,
                                    participants=participants, config={})
        digest, theta = record.global_after, after
    return store


@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_shortcut_and_general_rule_agree_on_a_random_fedavg_history(
    tmp_path: Path, codec: str
) -> None:
    # Prepare
    with _random_fedavg_store(tmp_path / "run", codec=codec, seed=3) as store:
        federation = RepairFederation({}, {})
        # Execute
        fast = run({"shortcut": "on"}, request(store, {"u"}, federation, tmp_path / "1"))
        general = run({"shortcut": "off"}, request(store, {"u"}, federation, tmp_path / "2"))
        stored = store.global_model(store.last_round)
    # Assert: same rounds, same non-floating tensors, floats equal up to the rounding of
    # the float32 global models (each |θ| < 6: a few ulps of 6 per round, 2^-21 ≈ 5e-7)
    # plus, with fp16 updates, the general rule's rounding of every remaining update
    # (|Δ| < 1: 2^-11 relative per update, weighted sum < 1e-3).
    assert fast.rounds_affected == general.rounds_affected
    assert 2 in fast.rounds_affected and 5 in fast.rounds_affected
    assert list(fast.model) == list(stored) == ["w", "steps", "b"]
    np.testing.assert_array_equal(fast.model["steps"], stored["steps"])
    atol = 1e-5 if codec == "fp32" else 2e-3
    for k in ("w", "b"):
        assert fast.model[k].dtype == np.float32
        np.testing.assert_allclose(fast.model[k], general.model[k], rtol=0, atol=atol)
        assert np.abs(fast.model[k] - stored[k]).max() > 10 * atol  # something changed


def test_a_recorded_flower_run_is_served_by_the_shortcut_as_by_the_general_rule(
    trained_run: Path, tmp_path: Path
) -> None:
    # Prepare: fedforget's app records FedAvg as a weighted-mean aggregation.
    with HistoryStore.open(trained_run) as store:
        assert store.recording["aggregation"] == "weighted-mean"
        federation = RepairFederation({}, {})
        forget = {"client-001"}
        # Execute
        fast = run({}, request(store, forget, federation, tmp_path / "1"))
        general = run({"shortcut": "off"}, request(store, forget, federation, tmp_path / "2"))
        original = store.global_model(store.last_round)
    # Assert: the shortcut read fewer blobs, and both rules give the same model up to the
    # float32 rounding of the stored models (|θ| < 1 here: ulp 2^-23 per term, a few terms
    # per round, three rounds: well under 2e-6).
    assert "weighted-mean shortcut" in fast.notes[1]
    assert "every participant's update" in general.notes[1]
    assert fast.rounds_affected == general.rounds_affected == [1, 2, 3]
    for k, v in original.items():
        np.testing.assert_allclose(fast.model[k], general.model[k], rtol=0, atol=2e-6)
        assert np.abs(fast.model[k] - v).max() > 1e-4


@pytest.mark.parametrize("blas_from", [1 << 60, 0], ids=["numpy", "blas"])
def test_the_in_place_sum_is_the_float64_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             blas_from: int) -> None:
    # Prepare: a model of two tensors (one spanning several chunks), two stored updates
    from fedforget.history import ParticipantUpdate
    from fedforget.history.views import BlobViews
    from fedforget.unlearning import subtract

    monkeypatch.setattr(subtract, "_BLAS_FROM", blas_from)
    rng = np.random.default_rng(1)
    n = 3 * subtract._CHUNK + 5
    theta = {"w": rng.standard_normal(n).astype(np.float32),
             "b": rng.standard_normal((3, 2)).astype(np.float32)}
    ups = {c: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in theta.items()}
           for c in ("a", "b")}
    with HistoryStore.create(tmp_path / "run", run_config={}, fsync=False) as store:
        start = store.put_initial_model(theta)
        record = store.commit_round(
            round=1, global_before=start, global_after=theta, config={},
            participants=[ParticipantUpdate(client_id=c, num_examples=1, weight=0.5, seed=1,
                                            update=ups[c]) for c in ("a", "b")])
        digests = {p.client_id: p.update_digest for p in record.participants}
        terms = [(0.3, start, "θ"), (-1.7, digests["a"], "a"), (1.0, digests["b"], "b"),
                 (-1.0, digests["a"], "a again")]
        # Execute
        with BlobViews(store) as views:
            acc, head = subtract.combine(views, terms)
            assert head is not None and head.digest == start
    # Assert: 0.3 θ - 1.7 a + b - a, in float64
    for k in theta:
        expected = (0.3 * theta[k].astype(np.float64) - 2.7 * ups["a"][k].astype(np.float64)
                    + ups["b"][k].astype(np.float64))
        assert acc[k].dtype == np.float64
        np.testing.assert_allclose(acc[k], expected, rtol=1e-15, atol=1e-15)


def _unblocked_sum(terms: Sequence[tuple[float, np.ndarray]], *, kernel: str) -> np.ndarray:
    """The rule on whole arrays, term by term from float64 zeros. NumPy: ``acc ± x`` for a
    coefficient ±1, else ``acc + c x`` rounded twice (the product, then the sum). BLAS:
    daxpy on one thread (a fused multiply-add in the kernel's body, plain arithmetic for
    the last elements past a multiple of its unroll, so a split between threads would move
    those). PyTorch: ``acc.add_(x, alpha=c)`` over the whole array."""
    from scipy.linalg.blas import daxpy
    from threadpoolctl import threadpool_limits

    acc = np.zeros(terms[0][1].shape, np.float64)
    for coef, values in terms:
        if kernel == "torch":
            import torch

            torch.from_numpy(acc).add_(torch.from_numpy(np.ascontiguousarray(values)),
                                       alpha=coef)
            continue
        x = values.astype(np.float64)
        if coef == 1.0:
            acc = acc + x
        elif coef == -1.0:
            acc = acc - x
        elif kernel == "blas":
            with threadpool_limits(limits=1, user_api="blas"):
                acc = daxpy(x.reshape(-1), acc.copy().reshape(-1), a=coef).reshape(acc.shape)
        else:
            acc = acc + coef * x
    return acc


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("group_bytes", [1 << 29, 1], ids=["one-group", "a-group-per-blob"])
@pytest.mark.parametrize("kernel", ["numpy", "blas", "torch"])
def test_the_blocked_sum_is_the_unblocked_sum_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str, group_bytes: int,
        codec: str) -> None:
    # Prepare: random blobs of two tensors (one of several chunks and a ragged end, one
    # smaller than a chunk), random coefficients with ±1 among them, a blob used twice;
    # "blas" keeps float32 blobs off the PyTorch path, "torch" cuts its chunks small (it
    # reads float32 blobs only: fp16 and bf16 take the BLAS path there)
    from fedforget.history import ParticipantUpdate
    from fedforget.history.views import BlobViews
    from fedforget.unlearning import subtract

    monkeypatch.setattr(subtract, "_BLAS_FROM", 1 << 60 if kernel == "numpy" else 0)
    if kernel == "blas":
        monkeypatch.setattr(subtract, "_TORCH_DTYPES", frozenset())
    monkeypatch.setattr(subtract, "_TORCH_CHUNK", 1 << 14)
    monkeypatch.setattr(subtract, "_GROUP_BYTES", group_bytes)
    rng = np.random.default_rng(7)
    n = 2 * subtract._CHUNK + 123
    clients = [f"c{i}" for i in range(5)]
    theta = {"w": rng.standard_normal(n).astype(np.float32),
             "b": rng.standard_normal((7, 3)).astype(np.float32)}
    ups = {c: {k: (rng.standard_normal(v.shape) * 10.0 ** rng.integers(-4, 2)).astype(np.float32)
               for k, v in theta.items()} for c in clients}
    with HistoryStore.create(tmp_path / "run", run_config={}, codec=codec, fsync=False) as store:
        start = store.put_initial_model(theta)
        record = store.commit_round(
            round=1, global_before=start, global_after=theta, config={},
            participants=[ParticipantUpdate(client_id=c, num_examples=1, weight=0.2, seed=1,
                                            update=ups[c]) for c in clients])
        digests = [p.update_digest for p in record.participants]
        coefs = [1.0, *rng.standard_normal(4).tolist(), -1.0, float(rng.standard_normal())]
        blobs = [start, *digests[:4], digests[4], digests[0]]
        terms = [(c, d, f"term {i}") for i, (c, d) in enumerate(zip(coefs, blobs, strict=True))]
        stored = {d: store.client_update(1, p.client_id) for d, p in
                  zip(digests, record.participants, strict=True)}
        stored[start] = store.global_model(0)
        # Execute
        with BlobViews(store) as views:
            wide, _ = subtract.combine(views, terms)
        with BlobViews(store) as views:
            narrow, _ = subtract.combine(views, terms, dtype=np.float32)
    # Assert: the same float64 operations in the same order on every element, so the same
    # bits; the float32 result is that sum rounded once
    for k in theta:
        expected = _unblocked_sum([(c, stored[d][k]) for c, d, _ in terms],
                                  kernel="torch" if kernel == "torch" and codec == "fp32"
                                  else "numpy" if kernel == "numpy" else "blas")
        assert wide[k].dtype == np.float64 and narrow[k].dtype == np.float32
        assert wide[k].tobytes() == expected.tobytes()
        assert narrow[k].tobytes() == expected.astype(np.float32).tobytes()


def test_the_pytorch_sum_has_the_same_bits_on_one_thread_and_on_two(tmp_path: Path) -> None:
    # Prepare: float32 blobs of a model large enough for the PyTorch path, its tensor two
    # chunks and a ragged end, each chunk large enough for PyTorch to split between threads
    import torch

    from fedforget.history import ParticipantUpdate
    from fedforget.history.views import BlobViews
    from fedforget.unlearning import subtract

    rng = np.random.default_rng(3)
    n = max(subtract._BLAS_FROM, 2 * subtract._TORCH_CHUNK + 123)
    theta = {"w": rng.standard_normal(n).astype(np.float32)}
    clients = ["a", "b", "c"]
    ups = {c: {"w": (rng.standard_normal(n) * 1e-2).astype(np.float32)} for c in clients}
    with HistoryStore.create(tmp_path / "run", run_config={}, fsync=False) as store:
        start = store.put_initial_model(theta)
        record = store.commit_round(
            round=1, global_before=start, global_after=theta, config={},
            participants=[ParticipantUpdate(client_id=c, num_examples=1, weight=1 / 3, seed=1,
                                            update=ups[c]) for c in clients])
        coefs = rng.standard_normal(len(clients) + 1).tolist()
        terms = [(c, d, f"term {i}") for i, (c, d) in enumerate(zip(
            coefs, [start, *(p.update_digest for p in record.participants)], strict=True))]
        threads = torch.get_num_threads()
        found = {}
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                with BlobViews(store) as views:
                    found[count], _ = subtract.combine(views, terms)
        finally:
            torch.set_num_threads(threads)
    # Assert: both equal the whole-array PyTorch sum, bit for bit
    expected = _unblocked_sum([(coefs[0], theta["w"]), *((c, ups[k]["w"]) for c, k in
                                                          zip(coefs[1:], clients, strict=True))],
                              kernel="torch")
    assert found[1]["w"].tobytes() == expected.tobytes()
    assert found[2]["w"].tobytes() == expected.tobytes()

"""FedRecovery: residual subtraction plus Gaussian noise, server-side only."""

from __future__ import annotations

import math
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
from fedforget.unlearning.base import Cost, RetentionError, UnlearningRequest, UnlearningResult
from fedforget.unlearning.fedrecovery import FedRecovery, gaussian_sigma, residual_norm
from fedforget.unlearning.subtract import removal_residual

Round = dict[str, tuple[int, dict[str, Any]]]  # client id -> (n_k, update)



def build_store(path: Path, theta0: Tensors, rounds: Sequence[Any], **kw: Any) -> HistoryStore:
    """A FedAvg history (``local-epochs`` 1 unless given)."""
    kw.setdefault("local_epochs", 1)
    return _build_store(path, theta0, rounds, **kw)


class ServerOnly:
    """A federation that must never be asked for client work."""

    def __init__(self) -> None:
        self.cost = Cost()

    @property
    def roster(self) -> tuple[str, ...]:
        return ("a", "b", "u")

    def replay(self, **kwargs: Any) -> Tensors:
        raise AssertionError("fedrecovery is server-only")

    def train(self, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("fedrecovery is server-only")

    def evaluate_local(self, model: Tensors, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def request(store: HistoryStore, forget: set[str], tmp_path: Path,
            federation: Any = None) -> UnlearningRequest:
    return UnlearningRequest(store=store, forget=frozenset(forget),
                             federation=federation or ServerOnly(),
                             workdir=str(tmp_path / "work"))


def run(params: Mapping[str, Any], req: UnlearningRequest) -> UnlearningResult:
    return get_method("fedrecovery", params).unlearn(req)


# The 3-round history of the subtract tests (clients a, b; u to forget):
#   θ_0 = w [1, 2], b [[0, 0]]
#   round 1: a (n=1) w [4, 0] b [[2, 2]];  b (n=1) w [0, 4] b [[-2, 2]];
#            u (n=2) w [8, 8] b [[4, 4]]
#            g_1 = w [5, 5], b [[2, 3]];  without u (a, b at 1/2): w [2, 2], b [[0, 2]]
#            r_1 = w [-3, -3], b [[-2, -1]],          ‖r_1‖² = 9 + 9 + 4 + 1 = 23
#   round 2: a (n=1) w [2, 2] b [[0, 4]];  u (n=3) w [4, 0] b [[4, 0]]
#            g_2 = w [3.5, 0.5], b [[3, 1]];  without u (a alone): w [2, 2], b [[0, 4]]
#            r_2 = w [-1.5, 1.5], b [[-3, 3]],        ‖r_2‖² = 2.25 + 2.25 + 9 + 9 = 22.5
#   round 3: a (n=2) w [1, 0] b [[0, 0]];  b (n=2) w [0, 1] b [[2, 2]];  r_3 = 0
#   θ_3 = w [10, 8], b [[6, 5]]
#   θ~ = θ_3 + r_1 + r_2 = w [10 - 3 - 1.5, 8 - 3 + 1.5], b [[6 - 2 - 3, 5 - 1 + 3]]
#      = w [5.5, 6.5], b [[1, 7]]
ROUNDS: list[Round] = [
    {"a": (1, {"w": [4, 0], "b": [[2, 2]]}), "b": (1, {"w": [0, 4], "b": [[-2, 2]]}),
     "u": (2, {"w": [8, 8], "b": [[4, 4]]})},
    {"a": (1, {"w": [2, 2], "b": [[0, 4]]}), "u": (3, {"w": [4, 0], "b": [[4, 0]]})},
    {"a": (2, {"w": [1, 0], "b": [[0, 0]]}), "b": (2, {"w": [0, 1], "b": [[2, 2]]})},
]
NOISELESS = tensors([5.5, 6.5], [[1, 7]])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with build_store(tmp_path / "run", tensors([1, 2], [[0, 0]]), ROUNDS) as s:
        yield s


def assert_tensors(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                   atol: float = 1e-6) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == np.float32
        np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=atol)


def test_registered_under_its_name() -> None:
    assert METHODS["fedrecovery"] is FedRecovery


def test_residuals_by_hand(store: HistoryStore) -> None:
    r1 = removal_residual(store, 1, frozenset({"u"}))
    r2 = removal_residual(store, 2, frozenset({"u"}))
    np.testing.assert_allclose(r1["w"], [-3, -3], atol=1e-12)
    np.testing.assert_allclose(r1["b"], [[-2, -1]], atol=1e-12)
    np.testing.assert_allclose(r2["w"], [-1.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(r2["b"], [[-3, 3]], atol=1e-12)
    assert residual_norm(r1) == pytest.approx(math.sqrt(23))
    assert residual_norm(r2) == pytest.approx(math.sqrt(22.5))


def test_noise_off_gives_the_deterministic_subtraction(store: HistoryStore, tmp_path: Path) -> None:
    # Execute
    result = run({"noise": False, "weights": "unit"}, request(store, {"u"}, tmp_path))
    # Assert
    assert_tensors(result.model, NOISELESS)
    assert result.rounds_affected == [1, 2]
    assert result.cost.client_epochs == 0 and result.cost.rounds == 0


def test_sigma_of_the_gaussian_mechanism_by_hand() -> None:
    # S = 2, ε = 0.5, δ = 1e-5:  ln(1.25e5) = ln 1.25 + 5 ln 10 = 0.2231436 + 11.5129255
    #   = 11.7360690;  sqrt(2 · 11.7360690) = sqrt(23.4721381) = 4.8448053;  σ = 4 · 4.8448053
    assert gaussian_sigma(2.0, 0.5, 1e-5) == pytest.approx(19.379221, rel=1e-6)
    assert gaussian_sigma(0.0, 0.5, 1e-5) == 0.0


def test_noise_is_seeded_with_the_derived_sensitivity(store: HistoryStore, tmp_path: Path) -> None:
    # Derived S = 2 · max(‖r_1‖, ‖r_2‖) = 2·sqrt(23); σ = S/ε · sqrt(2 ln(1.25/δ)), ε = 1.
    sigma = 2 * math.sqrt(23) * math.sqrt(2 * math.log(1.25 / 1e-5))
    # The noise is drawn from default_rng(seed), tensor by tensor in model order.
    rng = np.random.default_rng(7)
    noise = {"w": rng.normal(0.0, sigma, 2), "b": rng.normal(0.0, sigma, (1, 2))}
    expected = {k: NOISELESS[k] + noise[k] for k in NOISELESS}
    # Execute
    unit = {"weights": "unit"}
    result = run({"noise-seed": 7, **unit}, request(store, {"u"}, tmp_path))
    again = run({"noise-seed": 7, **unit}, request(store, {"u"}, tmp_path))
    other = run({"noise-seed": 8, **unit}, request(store, {"u"}, tmp_path))
    # Assert
    assert_tensors(result.model, expected, atol=1e-4)
    assert all(np.array_equal(result.model[k], again.model[k]) for k in NOISELESS)
    assert not np.array_equal(result.model["w"], other.model["w"])
    assert any(f"sigma = {sigma:.6g}" in note for note in result.notes)
    assert any("(epsilon, delta) figure is nominal" in note for note in result.notes)


def test_empirical_noise_std_matches_sigma(tmp_path: Path) -> None:
    # Prepare: a 4096-entry model; θ_0 = 0, round 1: a (n=1) Δ = 1, u (n=1) Δ = 3.
    # Given S = 1, ε = 1, δ = 1e-5: σ = sqrt(2 ln 125000) = 4.8448053.
    size = 4096
    rounds: list[Round] = [
        {"a": (1, {"w": np.ones(size), "b": np.ones((1, 2))}),
         "u": (1, {"w": np.full(size, 3.0), "b": np.full((1, 2), 3.0)})},
    ]
    theta0 = {"w": np.zeros(size, np.float32), "b": np.zeros((1, 2), np.float32)}
    sigma = 4.8448053
    samples = []
    with build_store(tmp_path / "run", theta0, rounds) as store:
        base = run({"noise": False, "weights": "unit"}, request(store, {"u"}, tmp_path)).model
        # Without u the model is θ_0 + 1 = 1 everywhere (θ_1 = 2, residual -1).
        np.testing.assert_array_equal(base["w"], np.ones(size, np.float32))
        for seed in range(12):
            noisy = run({"noise-seed": seed, "sensitivity": 1.0, "weights": "unit"},
                        request(store, {"u"}, tmp_path)).model
            samples.append(noisy["w"].astype(np.float64) - base["w"])
    pooled = np.concatenate(samples)  # 49152 draws: the sample std is within ~0.3% of σ
    # Tolerance 2% on the std (≈6 standard errors), 0.03σ on the mean (≈7 standard errors).
    assert pooled.std() == pytest.approx(sigma, rel=0.02)
    assert abs(pooled.mean()) < 0.03 * sigma


def test_forgetting_a_client_who_never_took_part_adds_no_noise(
    store: HistoryStore, tmp_path: Path
) -> None:
    result = run({}, request(store, {"nobody"}, tmp_path))
    assert_tensors(result.model, store.global_model(3), atol=0)
    assert result.rounds_affected == []


def test_a_contribution_in_a_round_not_retained_is_refused(tmp_path: Path) -> None:
    rounds: list[Round] = [
        {"a": (1, {"w": [2, 2], "b": [[2, 0]]})},
        {"a": (1, {"w": [1, 0], "b": [[0, 1]]}), "u": (1, {"w": [4, 0], "b": [[0, 4]]})},
    ]
    message = (
        "fedrecovery needs the stored client updates of every round a forgotten client "
        "took part in ([2]); the history keeps them only every 2 rounds (1, 3, 5, ...), "
        "so rounds [2] are missing"
    )
    with (
        build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), rounds,
                    retain_interval=2) as store,
        pytest.raises(RetentionError, match=re.escape(message)),
    ):
        run({}, request(store, {"u"}, tmp_path))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epsilon": 0}, "epsilon = 0.0 is out of range; expected > 0"),
        ({"delta": 1}, "delta = 1.0 is out of range; expected > 0 and < 1"),
        ({"delta": 0.0}, "delta = 0.0 is out of range; expected > 0 and < 1"),
        ({"sensitivity": -1}, "sensitivity = -1.0 is out of range; expected >= 0"),
        ({"noise-seed": -2}, "noise-seed = -2 is out of range; expected >= -1"),
        ({"noise": "yes"}, "noise = 'yes': expected true or false"),
        ({"sigma": -0.5}, "sigma = -0.5 is out of range; expected >= 0"),
        ({"weights": "sum"}, "weights = 'sum' is not allowed; expected one of 'paper', 'unit'"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("fedrecovery", params)


# The paper's weights on the same history: g_t = θ_t - θ_{t-1}
#   g_1 = w [5, 5],     b [[2, 3]]   ‖g_1‖² = 25 + 25 + 4 + 9 = 63
#   g_2 = w [3.5, 0.5], b [[3, 1]]   ‖g_2‖² = 12.25 + 0.25 + 9 + 1 = 22.5
#   g_3 = w [0.5, 0.5], b [[1, 1]]   ‖g_3‖² = 0.25 + 0.25 + 1 + 1 = 2.5
#   Σ = 88: p_1 = 63/88, p_2 = 22.5/88 (p_3 = 2.5/88, r_3 = 0)
#   θ~ = θ_3 + p_1 r_1 + p_2 r_2:
#     w: 10 - 3·63/88 - 1.5·22.5/88 = 10 - 222.75/88;  8 - 3·63/88 + 1.5·22.5/88 = 8 - 155.25/88
#     b: 6 - 2·63/88 - 3·22.5/88 = 6 - 193.5/88;       5 - 63/88 + 3·22.5/88 = 5 + 4.5/88
PAPER = tensors([10 - 222.75 / 88, 8 - 155.25 / 88], [[6 - 193.5 / 88, 5 + 4.5 / 88]])


def test_paper_weights_average_the_residuals(store: HistoryStore, tmp_path: Path) -> None:
    # Execute
    result = run({"noise": False}, request(store, {"u"}, tmp_path))
    # Assert
    assert_tensors(result.model, PAPER, atol=1e-5)
    assert any("p_t = |g_t|^2 / sum_j |g_j|^2 (1: 0.7159, 2: 0.2557)" in n for n in result.notes)


def test_sigma_set_directly_and_the_weighted_sensitivity(store: HistoryStore,
                                                         tmp_path: Path) -> None:
    # Prepare: σ = 0.25 given; the derived S = 2 · max(63/88 · sqrt(23), 22.5/88 · sqrt(22.5))
    rng = np.random.default_rng(3)
    noise = {"w": rng.normal(0.0, 0.25, 2), "b": rng.normal(0.0, 0.25, (1, 2))}
    derived_s = 2 * max(63 / 88 * math.sqrt(23), 22.5 / 88 * math.sqrt(22.5))
    sigma = derived_s * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    # Execute
    direct = run({"noise-seed": 3, "sigma": 0.25}, request(store, {"u"}, tmp_path))
    calibrated = run({"noise-seed": 3, "epsilon": 0.5}, request(store, {"u"}, tmp_path))
    # Assert
    assert_tensors(direct.model, {k: PAPER[k] + noise[k] for k in PAPER}, atol=1e-5)
    assert any("no (epsilon, delta) figure is claimed" in n for n in direct.notes)
    assert any(f"sigma = {sigma:.6g}" in n and "nominal (the sensitivity is a heuristic" in n
               for n in calibrated.notes)

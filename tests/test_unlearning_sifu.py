"""SIFU: the sensitivity bound, the rollback round, the noise and the retraining rounds."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from history_builders import build_store, tensors

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.unlearning import METHODS, get_method
from fedforget.unlearning.base import ClientUpdate, Cost, RetentionError, UnlearningRequest
from fedforget.unlearning.sifu import SIFU, psi_star, sensitivity_bounds


class Scripted:
    """Each client adds its fixed delta to every tensor it is sent."""

    def __init__(self, deltas: Mapping[str, tuple[float, int]]) -> None:
        self.deltas = dict(deltas)
        self.cost = Cost()
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return ("a", "b", "u")

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], **kw: Any) -> dict[str, ClientUpdate]:
        self.calls.append((server_round, tuple(clients)))
        self.cost.client_epochs += len(clients)
        return {c: ClientUpdate(c, {k: v + self.deltas[c][0] for k, v in global_model.items()},
                                self.deltas[c][1]) for c in clients}


# θ_0 = w [0, 0], b [[0, 0]]
# round 1: a (n=3) w [1, 0];  u (n=1) w [0.3, 0.4]: u's share 1/4, 1/4 / (3/4) · ‖Δu‖ = 1/3 · 0.5
#          Ψ_1 = 1/6
# round 2: a (n=1) w [0, 1];  b (n=1) w [1, 1] (no u):  Ψ_2 = κ Ψ_1
# round 3: a (n=1) w [1, 0];  u (n=1) w [0, 1.2], b [[0.5, 0]]: share 1/2, coefficient 1,
#          ‖Δu‖ = sqrt(1.44 + 0.25) = 1.3:  Ψ_3 = κ Ψ_2 + 1.3
ZERO_B = [[0, 0]]
ROUNDS: list[dict[str, tuple[int, dict[str, Any]]]] = [
    {"a": (3, {"w": [1, 0], "b": ZERO_B}), "u": (1, {"w": [0.3, 0.4], "b": ZERO_B})},
    {"a": (1, {"w": [0, 1], "b": ZERO_B}), "b": (1, {"w": [1, 1], "b": ZERO_B})},
    {"a": (1, {"w": [1, 0], "b": ZERO_B}), "u": (1, {"w": [0, 1.2], "b": [[0.5, 0]]})},
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with build_store(tmp_path / "run", tensors([0, 0], ZERO_B), ROUNDS) as s:
        yield s


def test_registered_under_its_name() -> None:
    assert METHODS["sifu"] is SIFU


def test_bounds_by_hand(store: HistoryStore) -> None:
    plain = sensitivity_bounds(store, frozenset({"u"}))
    halved = sensitivity_bounds(store, frozenset({"u"}), contraction=0.5)
    assert plain == pytest.approx({0: 0.0, 1: 1 / 6, 2: 1 / 6, 3: 1 / 6 + 1.3})
    assert halved == pytest.approx({0: 0.0, 1: 1 / 6, 2: 1 / 12, 3: 1 / 24 + 1.3})


def test_psi_star_by_hand() -> None:
    # ε = 10, σ = 0.05, δ = 0.1: sqrt(2 ln 12.5) = sqrt(5.0514573) = 2.2475447
    assert psi_star(epsilon=10, sigma=0.05, delta=0.1) == pytest.approx(0.5 / 2.2475447)


def test_rollback_noise_and_retraining(store: HistoryStore, tmp_path: Path) -> None:
    # ψ* = 0.2224647 (δ = 0.1): Ψ_2 = 1/6 within, Ψ_3 = 1.4667 not: roll back to θ_2
    #   θ_2 = θ_0 + (3·[1, 0] + [0.3, 0.4]) / 4 + ([0, 1] + [1, 1]) / 2 = w [1.325, 1.1]
    # noise N(0, 0.05²) from default_rng(4), tensor by tensor; retraining round 3 without u:
    #   a adds 1 (n=1), b adds -1 (n=3): the mean moves every entry by (1 - 3) / 4 = -0.5
    fed = Scripted({"a": (1.0, 1), "b": (-1.0, 3)})
    rng = np.random.default_rng(4)
    noise = {"w": rng.normal(0, 0.05, 2), "b": rng.normal(0, 0.05, (1, 2))}
    expected = {"w": np.array([1.325, 1.1]) + noise["w"] - 0.5, "b": noise["b"] - 0.5}

    result = SIFU(SIFU.Params.from_mapping({"delta": 0.1, "noise-seed": 4})).unlearn(
        UnlearningRequest(store=store, forget=frozenset({"u"}), federation=fed,  # type: ignore[arg-type]
                          workdir=str(tmp_path)))

    assert fed.calls == [(3, ("a", "b"))]
    for k in expected:
        np.testing.assert_allclose(result.model[k], expected[k], rtol=0, atol=1e-6)
    assert result.cost.client_epochs == 2
    assert any("up to round 2" in note for note in result.notes)
    assert any("nominal" in note for note in result.notes)


def test_a_tight_budget_rolls_back_to_the_start(store: HistoryStore, tmp_path: Path) -> None:
    # σ = 0.02: ψ* = 0.2 / 2.2475447 = 0.089 < Ψ_1 = 1/6: θ_0, then rounds 1..3 without u;
    # δ = 0 takes 1/M = 1/3 with M = 3 clients: sqrt(2 ln 3.75) = 1.6258880, ψ* = 0.123
    fed = Scripted({"a": (1.0, 1), "b": (-1.0, 3)})
    result = get_method("sifu", {"sigma": 0.02}).unlearn(UnlearningRequest(
        store=store, forget=frozenset({"u"}), federation=fed, workdir=str(tmp_path)))  # type: ignore[arg-type]
    assert [c[0] for c in fed.calls] == [1, 2, 3]
    assert any(f"= {10 * 0.02 / math.sqrt(2 * math.log(3.75)):.6g}" in n for n in result.notes)


def test_a_round_not_retained_is_refused(tmp_path: Path) -> None:
    rounds = [ROUNDS[1], ROUNDS[0]]  # u takes part in round 2, not retained with Δt = 2
    with build_store(tmp_path / "r2", tensors([0, 0], ZERO_B), rounds, retain_interval=2) as s, \
            pytest.raises(RetentionError, match=re.escape("round 2 was not retained")):
        get_method("sifu").check(UnlearningRequest(
            store=s, forget=frozenset({"u"}), federation=Scripted({}), workdir=""))  # type: ignore[arg-type]


@pytest.mark.parametrize(("params", "message"), [
    ({"sigma": 0}, "sigma = 0.0 is out of range; expected > 0"),
    ({"delta": 1}, "delta = 1.0 is out of range; expected >= 0 and < 1"),
    ({"contraction": 1.5}, "contraction = 1.5 is out of range; expected > 0 and <= 1"),
])
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("sifu", params)

"""Fast-FedUL: the skew recursion on a hand-made history, server-side only."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from history_builders import build_store, tensors

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.unlearning import METHODS, get_method
from fedforget.unlearning.base import Cost, RetentionError, UnlearningRequest
from fedforget.unlearning.fastfedul import FastFedUL


class ServerOnly:
    """A federation that must never be asked for client work."""

    def __init__(self) -> None:
        self.cost = Cost()

    @property
    def roster(self) -> tuple[str, ...]:
        return ("a", "b", "u")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fastfedul is server-only; it asked for {name}")


# The history of the subtract and fedrecovery tests (u to forget):
#   θ_0 = w [1, 2], b [[0, 0]]
#   round 1: a (n=1), b (n=1), u (n=2): weights 1/4, 1/4, 1/2
#            r_1 = w [-3, -3], b [[-2, -1]];        β'_1 = 1/2
#   round 2: a (n=1), u (n=3): weights 1/4, 3/4
#            r_2 = w [-1.5, 1.5], b [[-3, 3]];      β'_2 = 1/4
#   round 3: a (n=2), b (n=2): r_3 = 0;             β'_3 = 1
#   θ_3 = w [10, 8], b [[6, 5]]
ROUNDS: list[dict[str, tuple[int, dict[str, Any]]]] = [
    {"a": (1, {"w": [4, 0], "b": [[2, 2]]}), "b": (1, {"w": [0, 4], "b": [[-2, 2]]}),
     "u": (2, {"w": [8, 8], "b": [[4, 4]]})},
    {"a": (1, {"w": [2, 2], "b": [[0, 4]]}), "u": (3, {"w": [4, 0], "b": [[4, 0]]})},
    {"a": (2, {"w": [1, 0], "b": [[0, 0]]}), "b": (2, {"w": [0, 1], "b": [[2, 2]]})},
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with build_store(tmp_path / "run", tensors([1, 2], [[0, 0]]), ROUNDS) as s:
        yield s


def run(store: HistoryStore, params: Mapping[str, Any], forget: set[str] | None = None,
        tmp_path: Path | None = None) -> Any:
    return get_method("fastfedul", params).unlearn(UnlearningRequest(
        store=store, forget=frozenset(forget or {"u"}), federation=ServerOnly(),  # type: ignore[arg-type]
        workdir=str(tmp_path or "")))


def assert_tensors(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == np.float32
        np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-5)


def test_registered_under_its_name() -> None:
    assert METHODS["fastfedul"] is FastFedUL and not FastFedUL.needs_clients


def test_code_rule_contracts_the_skew_by_hand(store: HistoryStore) -> None:
    # α = 0.2: factors 1 - 0.2·β' = 0.9 (round 1, on D_0 = 0), 0.95 (round 2), 0.8 (round 3)
    #   D_1 = r_1;  D_2 = 0.95 r_1 + r_2;  D_3 = 0.8 D_2 = 0.76 r_1 + 0.8 r_2
    #   w: 0.76·-3 + 0.8·-1.5 = -3.48;   0.76·-3 + 0.8·1.5 = -1.08
    #   b: 0.76·-2 + 0.8·-3 = -3.92;     0.76·-1 + 0.8·3 = 1.64
    result = run(store, {"lipschitz": 0.2})
    assert_tensors(result.model, tensors([10 - 3.48, 8 - 1.08], [[6 - 3.92, 5 + 1.64]]))
    assert result.rounds_affected == [1, 2]
    assert result.cost.client_epochs == 0


def test_paper_rule_grows_the_skew_by_hand(store: HistoryStore) -> None:
    # α = 0.1, factor 1.1 every round: D_3 = 1.21 r_1 + 1.1 r_2
    #   w: -3.63 - 1.65 = -5.28;  -3.63 + 1.65 = -1.98
    #   b: -2.42 - 3.3 = -5.72;  -1.21 + 3.3 = 2.09
    result = run(store, {"lipschitz": 0.1, "rule": "paper"})
    assert_tensors(result.model, tensors([10 - 5.28, 8 - 1.98], [[6 - 5.72, 5 + 2.09]]))


def test_zero_lipschitz_is_the_plain_subtraction_and_scale_halves_it(store: HistoryStore) -> None:
    # α = 0: D_3 = r_1 + r_2 = w [-4.5, -1.5], b [[-5, 2]]; scale 0.5 applies half of it
    assert_tensors(run(store, {"lipschitz": 0.0}).model, tensors([5.5, 6.5], [[1, 7]]))
    assert_tensors(run(store, {"lipschitz": 0.0, "scale": 0.5}).model,
                   tensors([7.75, 7.25], [[3.5, 6]]))


def test_a_client_who_never_took_part_changes_nothing(store: HistoryStore) -> None:
    result = run(store, {}, forget={"nobody"})
    assert_tensors(result.model, store.global_model(3))
    assert result.rounds_affected == []


def test_a_contribution_not_retained_is_refused(tmp_path: Path) -> None:
    rounds = [{"a": (1, {"w": [2, 2], "b": [[2, 0]]})},
              {"a": (1, {"w": [1, 0], "b": [[0, 1]]}), "u": (1, {"w": [4, 0], "b": [[0, 4]]})}]
    with build_store(tmp_path / "r", tensors([0, 0], [[0, 0]]), rounds,
                     retain_interval=2) as store, \
            pytest.raises(RetentionError, match=re.escape("rounds [2] are missing")):
        run(store, {})


@pytest.mark.parametrize(("params", "message"), [
    ({"lipschitz": -0.1}, "lipschitz = -0.1 is out of range; expected >= 0"),
    ({"rule": "growth"}, "rule = 'growth' is not allowed; expected one of 'code', 'paper'"),
    ({"scale": -1}, "scale = -1.0 is out of range; expected >= 0"),
])
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("fastfedul", params)

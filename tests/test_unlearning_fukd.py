"""FUKD: the subtraction of the forgotten clients' updates and the distillation step."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from history_builders import build_store, tensors

from fedforget.data import ArrayDataset
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.unlearning import METHODS, get_method
from fedforget.unlearning.base import Cost, UnlearningError, UnlearningRequest
from fedforget.unlearning.fukd import FUKD, distill


class ServerOnly:
    def __init__(self) -> None:
        self.cost = Cost()

    @property
    def roster(self) -> tuple[str, ...]:
        return ("a", "b", "u")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fukd is server-only; it asked for {name}")


class Side:
    """A server-side task: a 2 -> 2 linear model and a one-example proxy set."""

    def __init__(self, proxy: ArrayDataset | None) -> None:
        self.proxy = proxy

    def new_model(self) -> torch.nn.Module:
        return torch.nn.Linear(2, 2)

    def proxy_data(self) -> ArrayDataset | None:
        return self.proxy


# The history of the subtract tests, u to forget. u's weighted updates:
#   round 1: 1/2 · (w [8, 8], b [[4, 4]]) = w [4, 4], b [[2, 2]]
#   round 2: 3/4 · (w [4, 0], b [[4, 0]]) = w [3, 0], b [[3, 0]]
#   θ_F = θ_3 - (w [7, 4], b [[5, 2]]) = w [3, 4], b [[1, 3]]
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


def request(store: HistoryStore, side: Any = None) -> UnlearningRequest:
    return UnlearningRequest(store=store, forget=frozenset({"u"}), federation=ServerOnly(),  # type: ignore[arg-type]
                             workdir="", server_side=side)


def test_registered() -> None:
    assert METHODS["fukd"] is FUKD and not FUKD.needs_clients


def test_subtraction_of_the_weighted_updates_by_hand(store: HistoryStore) -> None:
    result = get_method("fukd", {"epochs": 0}).unlearn(request(store))
    np.testing.assert_allclose(result.model["w"], [3, 4], atol=1e-6)
    np.testing.assert_allclose(result.model["b"], [[1, 3]], atol=1e-6)
    assert result.cost.client_epochs == 0
    # the renormalised variant is subtract's θ_3 + r_1 + r_2 = w [5.5, 6.5], b [[1, 7]]
    renorm = get_method("fukd", {"epochs": 0, "subtraction": "renormalised"}).unlearn(
        request(store))
    np.testing.assert_allclose(renorm.model["w"], [5.5, 6.5], atol=1e-6)


def one_step(student: Mapping[str, np.ndarray], teacher: Mapping[str, np.ndarray],
             x: np.ndarray, lr: float, tau: float) -> dict[str, np.ndarray]:
    """One SGD step on τ² KL(p_T || softmax(z/τ)) for z = W x + c, by hand: the gradient
    in z is τ (q - p_T), so ∂W = τ (q - p_T) xᵀ and ∂c = τ (q - p_T)."""
    def soft(z: np.ndarray) -> np.ndarray:
        e = np.exp(z / tau - np.max(z / tau))
        return e / e.sum()
    p_t = soft(teacher["weight"] @ x + teacher["bias"])
    q = soft(student["weight"] @ x + student["bias"])
    g = tau * (q - p_t)
    return {"weight": student["weight"] - lr * np.outer(g, x), "bias": student["bias"] - lr * g}


def test_one_distillation_step_by_hand() -> None:
    # Prepare
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    s0 = {k: v.detach().numpy().astype(np.float64).copy() for k, v in student.state_dict().items()}
    t0 = {k: v.detach().numpy().astype(np.float64) for k, v in teacher.state_dict().items()}
    x = np.array([0.5, -1.5])
    data = ArrayDataset(x=x[None].astype(np.float32), y=np.zeros(1, np.int64), num_classes=2,
                        name="proxy")
    # Execute
    distill(student, teacher, data, epochs=1, learning_rate=0.3, momentum=0.0, temperature=2.0,
            batch_size=8, seed=0)
    # Assert
    expected = one_step(s0, t0, x, 0.3, 2.0)
    for k, v in student.state_dict().items():
        np.testing.assert_allclose(v.numpy(), expected[k], rtol=1e-5, atol=1e-6)


def test_method_distils_from_the_original_model(tmp_path: Path) -> None:
    # Prepare: a history of the linear model; u's only update is weight +1, bias +1 (n=1 of 2)
    zero = {"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    rounds = [{"a": (1, {"weight": [[1, 0], [0, 1]], "bias": [0, 0]}),
               "u": (1, {"weight": [[1, 1], [1, 1]], "bias": [1, 1]})}]
    x = np.array([1.0, 2.0])
    proxy = ArrayDataset(x=x[None].astype(np.float32), y=np.zeros(1, np.int64), num_classes=2,
                         name="proxy")
    with build_store(tmp_path / "run", zero, rounds) as store:
        theta = {k: v.astype(np.float64) for k, v in store.global_model(1).items()}
        # θ_F = θ_1 - 1/2 · Δu: weight [[0.5, 0], [0, 0.5]], bias [0, 0]
        skewed = {"weight": np.array([[0.5, 0.0], [0.0, 0.5]]), "bias": np.zeros(2)}
        expected = one_step(skewed, theta, x, 0.2, 3.0)
        # Execute
        result = get_method("fukd", {"epochs": 1, "learning-rate": 0.2, "momentum": 0.0,
                                     "temperature": 3.0}).unlearn(request(store, Side(proxy)))
    # Assert
    for k in expected:
        np.testing.assert_allclose(result.model[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any("distilled from θ_1 on 1 proxy examples" in n for n in result.notes)


def test_without_a_proxy_set_it_is_refused(store: HistoryStore) -> None:
    with pytest.raises(UnlearningError, match="no server-side task"):
        get_method("fukd").unlearn(request(store))
    with pytest.raises(UnlearningError, match="an empty proxy set"):
        get_method("fukd").unlearn(request(store, Side(None)))


@pytest.mark.parametrize(("params", "message"), [
    ({"temperature": 0}, "temperature = 0.0 is out of range; expected > 0"),
    ({"subtraction": "x"}, "subtraction = 'x' is not allowed; expected one of 'paper', "
                           "'renormalised'"),
])
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("fukd", params)

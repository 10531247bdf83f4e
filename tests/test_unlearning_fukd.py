"""FUKD: the subtraction of the forgotten clients' updates and the distillation step."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from history_builders import build_store, tensors

from fedforget.data import ArrayDataset
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.tensors import tensors_digest
from fedforget.unlearning import METHODS, get_method
from fedforget.unlearning.base import ClientUpdate, Cost, UnlearningError, UnlearningRequest
from fedforget.unlearning.fukd import FUKD, distill
from fedforget.withdrawal import WithdrawalLedger


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


class Shifting:
    """Every client asked returns the global model plus its own fixed shift (n_k examples);
    epochs are counted as the federation counts them: each client asked, its local epochs
    (the app's ``local_epochs`` unless the request names others)."""

    local_epochs = 2

    def __init__(self, roster: Sequence[str],
                 shifts: Mapping[str, tuple[int, Mapping[str, Any]]]) -> None:
        self.cost = Cost()
        self._roster = tuple(sorted(roster))
        self.shifts = shifts
        self.calls: list[tuple[int, tuple[str, ...], str, int | None]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return self._roster

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.calls.append((server_round, tuple(clients), task, local_epochs))
        self.cost.client_epochs += len(clients) * (local_epochs or self.local_epochs)
        out = {}
        for c in clients:
            n, shift = self.shifts[c]
            out[c] = ClientUpdate(c, {k: (v + np.asarray(shift[k], np.float32)).astype(v.dtype)
                                      for k, v in global_model.items()}, n)
        return out


def request(store: HistoryStore, side: Any = None, federation: Any = None,
            observe: Any = None) -> UnlearningRequest:
    return UnlearningRequest(store=store, forget=frozenset({"u"}),
                             federation=federation or ServerOnly(), workdir="",
                             server_side=side, observe=observe)


def test_registered() -> None:
    assert METHODS["fukd"] is FUKD and not FUKD.needs_clients
    assert not get_method("fukd").uses_clients()
    assert get_method("fukd", {"post-rounds": 1}).uses_clients()


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
    ({"post-rounds": -1}, "post-rounds = -1 is out of range; expected >= 0"),
    ({"subtraction": "x"}, "subtraction = 'x' is not allowed; expected one of 'paper', "
                           "'renormalised'"),
])
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("fukd", params)


# ------------------------------------------------------------- post-training rounds
# a (n = 1) shifts w by [1, 1] and b by [[2, 0]]; b (n = 3) by [3, -1] and [[-2, 4]]; so
# each FedAvg round of a and b adds (1·shift_a + 3·shift_b) / 4 = w [2.5, -0.5], b [[-1, 3]].
SHIFTS = {"a": (1, {"w": [1, 1], "b": [[2, 0]]}), "b": (3, {"w": [3, -1], "b": [[-2, 4]]}),
          "c": (5, {"w": [100, 100], "b": [[100, 100]]}),
          "u": (2, {"w": [-100, -100], "b": [[-100, -100]]})}


def test_post_rounds_by_hand_without_the_forgotten_or_withdrawn_clients(
        store: HistoryStore) -> None:
    # Prepare: c withdrew earlier (the run's ledger); u is forgotten now. From θ_F = w [3, 4],
    # b [[1, 3]] (the subtraction above; no distillation) two rounds of a and b add
    # 2 · (w [2.5, -0.5], b [[-1, 3]]) = w [5, -1], b [[-2, 6]].
    with WithdrawalLedger(store.directory) as ledger:
        ledger.request("c", reason="earlier", roster={"a", "b", "c", "u"})
    fed = Shifting(["a", "b", "c", "u"], SHIFTS)
    seen: list[int] = []
    # Execute
    result = get_method("fukd", {"epochs": 0, "post-rounds": 2}).unlearn(
        request(store, federation=fed, observe=lambda t, _: seen.append(t)))
    # Assert: rounds T+1 = 4 and 5, only a and b, the run's epochs
    assert fed.calls == [(4, ("a", "b"), "train", None), (5, ("a", "b"), "train", None)]
    np.testing.assert_allclose(result.model["w"], [8, 3], atol=1e-6)
    np.testing.assert_allclose(result.model["b"], [[-1, 9]], atol=1e-6)
    # k post rounds cost k × (the remaining clients' epochs): 2 × (2 + 2)
    assert result.cost.client_epochs == 8
    assert seen == [3, 4, 5]
    assert any("post-training rounds 4..5 without the withdrawn clients ['c']" in n
               for n in result.notes)


def test_post_epochs_are_asked_of_every_remaining_client(store: HistoryStore) -> None:
    # Prepare: nobody withdrew before: a, b and c train, one epoch each, for 3 rounds
    fed = Shifting(["a", "b", "c", "u"], SHIFTS)
    # Execute
    result = get_method("fukd", {"epochs": 0, "post-rounds": 3, "post-epochs": 1}).unlearn(
        request(store, federation=fed))
    # Assert: 3 rounds × (1 + 1 + 1) epochs; u never asked
    assert [call[1:] for call in fed.calls] == [(("a", "b", "c"), "train", 1)] * 3
    assert result.cost.client_epochs == 9


def test_post_rounds_start_from_the_distilled_model(tmp_path: Path) -> None:
    # Prepare: the distillation test's history; one post round of a alone (u forgotten)
    # shifts the distilled model by a's shift
    zero = {"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    rounds = [{"a": (1, {"weight": [[1, 0], [0, 1]], "bias": [0, 0]}),
               "u": (1, {"weight": [[1, 1], [1, 1]], "bias": [1, 1]})}]
    x = np.array([1.0, 2.0])
    proxy = ArrayDataset(x=x[None].astype(np.float32), y=np.zeros(1, np.int64), num_classes=2,
                         name="proxy")
    shift = {"weight": [[0.5, -0.5], [0.25, 0.0]], "bias": [1.0, -1.0]}
    fed = Shifting(["a", "u"], {"a": (4, shift)})
    with build_store(tmp_path / "run", zero, rounds) as store:
        theta = {k: v.astype(np.float64) for k, v in store.global_model(1).items()}
        skewed = {"weight": np.array([[0.5, 0.0], [0.0, 0.5]]), "bias": np.zeros(2)}
        distilled = one_step(skewed, theta, x, 0.2, 3.0)
        # Execute
        result = get_method("fukd", {"epochs": 1, "learning-rate": 0.2, "momentum": 0.0,
                                     "temperature": 3.0, "post-rounds": 1}).unlearn(
            request(store, Side(proxy), federation=fed))
    # Assert
    assert fed.calls == [(2, ("a",), "train", None)]
    for k in distilled:
        np.testing.assert_allclose(result.model[k], distilled[k] + np.array(shift[k]),
                                   rtol=1e-5, atol=1e-6)
    assert result.cost.client_epochs == 2


def test_zero_post_rounds_is_the_papers_fukd_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: ServerOnly fails any request to the clients
    zero = {"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    rounds = [{"a": (1, {"weight": [[1, 0], [0, 1]], "bias": [0, 0]}),
               "u": (1, {"weight": [[1, 1], [1, 1]], "bias": [1, 1]})}]
    proxy = ArrayDataset(x=np.array([[1.0, 2.0], [0.5, -1.0]], np.float32),
                         y=np.zeros(2, np.int64), num_classes=2, name="proxy")
    with build_store(tmp_path / "run", zero, rounds) as store:
        # Execute
        plain = get_method("fukd").unlearn(request(store, Side(proxy)))
        zero_post = get_method("fukd", {"post-rounds": 0, "post-epochs": 3}).unlearn(
            request(store, Side(proxy)))
    # Assert
    assert tensors_digest(zero_post.model) == tensors_digest(plain.model)
    assert zero_post.cost.client_epochs == plain.cost.client_epochs == 0
    assert not any("post-training" in n for n in zero_post.notes)

"""Crab: time windows, KL round selection, cosine client selection, rollback, recovery."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore, ParticipantUpdate
from fedforget.unlearning import METHODS, get_method
from fedforget.unlearning.base import ClientUpdate, Cost, RetentionError, UnlearningRequest
from fedforget.unlearning.crab import (
    Crab,
    kl_change,
    loss_windows,
    rollback_round,
    select,
    similarity,
)

X = math.log(3.0)  # softmax([ln 3, 0]) = [3/4, 1/4]
R2 = math.sqrt(2.0)


class Scripted:
    """Each client adds its fixed delta to every entry of the model it is sent."""

    def __init__(self, deltas: Mapping[str, float]) -> None:
        self.deltas = dict(deltas)
        self.cost = Cost()
        self.calls: list[tuple[int, tuple[str, ...], int | None]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return ("a", "c", "u")

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None,
              **kw: Any) -> dict[str, ClientUpdate]:
        self.calls.append((server_round, tuple(clients), local_epochs))
        self.cost.client_epochs += len(clients) * (local_epochs or 1)
        return {c: ClientUpdate(c, {k: v + self.deltas[c] for k, v in global_model.items()}, 1)
                for c in clients}


# θ_0: w [0, 0], b [[1, 0]]; every participant reports the round's train-loss L_t.
# round 1 (L 1.00): a, c (n 1, 1): Δw 0, Δb [[1, 1]]            -> θ_1 w [0, 0],   b [[2, 1]]
# round 2 (L 0.95): a Δw [x, 0] Δb [[1, 1]]; c Δw [2x, 0] Δb [[2, 2]]; u Δw 0 Δb [[-3, -3]]
#                   (n 1 each; mean Δw [x, 0], Δb 0)            -> θ_2 w [x, 0],   b [[2, 1]]
# round 3 (L 0.80): a, u (n 1, 1): Δw 0, Δb [[1, 1]]            -> θ_3 w [x, 0],   b [[3, 2]]
# round 4 (L 0.78): a (n 1) Δw [1, 0] Δb [[1, 1]]; c (n 1) Δw [0, 1] Δb [[-4, -4]];
#                   u (n 2) Δw [4, 0] Δb 0
#                   (mean Δw [9/4, 1/4], Δb [[-3/4, -3/4]])     -> θ_4 w [x + 9/4, 1/4],
#                                                                  b [[9/4, 5/4]]
ROUNDS: list[tuple[float, dict[str, tuple[int, dict[str, Any]]]]] = [
    (1.00, {"a": (1, {"w": [0, 0], "b": [[1, 1]]}), "c": (1, {"w": [0, 0], "b": [[1, 1]]})}),
    (0.95, {"a": (1, {"w": [X, 0], "b": [[1, 1]]}), "c": (1, {"w": [2 * X, 0], "b": [[2, 2]]}),
            "u": (1, {"w": [0, 0], "b": [[-3, -3]]})}),
    (0.80, {"a": (1, {"w": [0, 0], "b": [[1, 1]]}), "u": (1, {"w": [0, 0], "b": [[1, 1]]})}),
    (0.78, {"a": (1, {"w": [1, 0], "b": [[1, 1]]}), "c": (1, {"w": [0, 1], "b": [[-4, -4]]}),
            "u": (2, {"w": [4, 0], "b": [[0, 0]]})}),
]


def build(path: Path, *, retain_interval: int = 1, losses: bool = True) -> HistoryStore:
    """The history above, global models the FedAvg sums, train-loss metrics per round."""
    store = HistoryStore.create(
        path, run_config={"local-epochs": 2, "learning-rate": 0.1, "batch-size": 8, "seed": 0},
        retain_interval=retain_interval, fsync=False)
    theta = {"w": np.zeros(2), "b": np.array([[1.0, 0.0]])}
    digest = store.put_initial_model({k: v.astype(np.float32) for k, v in theta.items()})
    for t, (loss, parts) in enumerate(ROUNDS, start=1):
        total = sum(n for n, _ in parts.values())
        participants = []
        for cid, (n, upd) in sorted(parts.items()):
            update = {k: np.asarray(v, dtype=np.float32) for k, v in upd.items()}
            participants.append(ParticipantUpdate(
                client_id=cid, num_examples=n, weight=n / total, seed=t, update=update,
                metrics={"train-loss": loss} if losses else {}))
            for k in theta:
                theta[k] = theta[k] + n / total * update[k]
        record = store.commit_round(
            round=t, global_before=digest, participants=participants, config={},
            global_after={k: v.astype(np.float32) for k, v in theta.items()})
        digest = record.global_after
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with build(tmp_path / "run") as s:
        yield s


def unlearn(store: HistoryStore, tmp_path: Path, forget: set[str], fed: Scripted,
            **params: Any) -> Any:
    return get_method("crab", params).unlearn(UnlearningRequest(
        store=store, forget=frozenset(forget), federation=fed,  # type: ignore[arg-type]
        workdir=str(tmp_path)))


def test_registered_under_its_name() -> None:
    assert METHODS["crab"] is Crab
    method = get_method("crab", {"round-ratio": 0.5, "rollback": "selection"})
    assert method.params.to_dict() == {"round-ratio": 0.5, "client-ratio": 0.7,
                                       "loss-drop": 0.1, "local-epochs": 0,
                                       "rollback": "selection"}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("round-ratio", 0, "round-ratio = 0.0 is out of range; expected > 0 and <= 1"),
    ("round-ratio", 1.5, "round-ratio = 1.5 is out of range; expected > 0 and <= 1"),
    ("client-ratio", 0.0, "client-ratio = 0.0 is out of range; expected > 0 and <= 1"),
    ("loss-drop", 1, "loss-drop = 1.0 is out of range; expected >= 0 and < 1"),
    ("loss-drop", -0.1, "loss-drop = -0.1 is out of range; expected >= 0 and < 1"),
    ("local-epochs", -1, "local-epochs = -1 is out of range; expected >= 0"),
    ("local-epochs", 1.5, "local-epochs = 1.5: expected an integer"),
    ("rollback", "first", "rollback = 'first' is not allowed; expected one of "
                          "'contribution', 'selection'"),
    ("window", 3, "unknown parameter 'window'"),
])
def test_bad_params_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        get_method("crab", {key: value})
    assert str(err.value).startswith(message)


def test_loss_windows_by_hand() -> None:
    # α = 0.1: opened at 1 (1.0), 0.95 is not < 0.9, 0.8 is: [1, 3]; 4 is the last round
    assert loss_windows([1.0, 0.95, 0.8, 0.78], 0.1) == [(1, 3), (4, 4)]
    # 0.85 < 0.9: [1, 2]; opened at 3 (0.7): 0.6 < 0.63: [3, 4]; then [5, 5]
    assert loss_windows([1.0, 0.85, 0.7, 0.6, 0.5], 0.1) == [(1, 2), (3, 4), (5, 5)]
    # α = 0: any decrease closes a window; a window never closes on its own opening round
    assert loss_windows([1.0, 1.0, 0.9], 0.0) == [(1, 3)]


def test_kl_change_by_hand() -> None:
    # KL([1/2, 1/2] || [3/4, 1/4]) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    before = {"w": np.zeros(2, np.float32), "b": np.array([[2, 1]], np.float32)}
    after = {"w": np.array([X, 0], np.float32), "b": np.array([[5, 4]], np.float32)}
    assert kl_change(before, after) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # adding a constant to a row leaves its softmax, and the divergence, unchanged
    assert kl_change(before, {"w": before["w"] + 7, "b": before["b"] - 2}) == pytest.approx(0)


def test_similarity_by_hand() -> None:
    # only b has two axes: cos([3, 2], [2, 1]) = 8 / (sqrt 13 sqrt 5)
    glob = {"w": np.array([5.0, 0.0]), "b": np.array([[2.0, 1.0]])}
    local = {"w": np.array([-1.0, 9.0]), "b": np.array([[3.0, 2.0]])}
    assert similarity(local, glob) == pytest.approx(8 / math.sqrt(65))


def test_selection_by_hand(store: HistoryStore) -> None:
    # windows [1, 3] and [4, 4]; KL_1 = KL_3 = 0 (w unchanged, b shifted by constants),
    # KL_2 = 1/2 ln(4/3): max(1, ⌊0.6·3⌋) = 1 round of the first window -> 2; the second -> 4
    # round 2 (θ_2 b [2, 1]): a [3, 2] cos 8/√65 = .992, c [4, 3] cos 11/(5√5) = .984,
    #   u [-1, -2] cos -4/5: ⌊0.7·3⌋ = 2 -> (a, c)
    # round 4 (θ_4 b [9/4, 5/4], norm √6.625): a [4, 3] cos 12.75/(5·2.5739) = .9907,
    #   c [-1, -2] cos < 0, u [3, 2] cos 9.25/(√13·2.5739) = .9967 -> (u, a)
    sel = select(store, round_ratio=0.6, client_ratio=0.7, loss_drop=0.1)
    assert sel.windows == ((1, 3), (4, 4))
    assert sel.kl[1] == pytest.approx(0, abs=1e-9)
    assert sel.kl[2] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert sel.kl[3] == pytest.approx(0, abs=1e-9)
    assert sel.rounds == (2, 4)
    assert sel.clients == {2: ("a", "c"), 4: ("u", "a")}


def test_rollback_rules(store: HistoryStore) -> None:
    sel = select(store, round_ratio=0.6, client_ratio=0.7, loss_drop=0.1)
    u = frozenset({"u"})
    # u first took part in round 2, a selected round: restart there
    assert rollback_round(sel, u, 2, rule="contribution") == (2, 2)
    # u is among the selected clients first in round 4: restart there
    assert rollback_round(sel, u, 2, rule="selection") == (4, 4)
    # c took part from round 1; no selected round is <= 1
    assert rollback_round(sel, frozenset({"c"}), 1, rule="contribution") == (1, None)


def test_recovery_contribution_rollback(store: HistoryStore, tmp_path: Path) -> None:
    # restart from θ_1 = w [0, 0], b [[2, 1]] (the model sent in round 2)
    # round 2: the stored updates of a and c (u dropped), weights 1/2, 1/2, no client work:
    #   w + ([x, 0] + [2x, 0]) / 2 = [1.5x, 0];  b + ([[1, 1]] + [[2, 2]]) / 2 = [[3.5, 2.5]]
    # round 4: (u, a) less u -> a trains E = 2 epochs from θ̂ and adds 0.5 everywhere;
    #   w: ‖Δ_{4,a}‖ = ‖[1, 0]‖ = 1 along [.5, .5] -> [1/√2, 1/√2]
    #   b: ‖[[1, 1]]‖ = √2 along [[.5, .5]] -> [[1, 1]]
    fed = Scripted({"a": 0.5, "c": 9.0, "u": 9.0})
    result = unlearn(store, tmp_path, {"u"}, fed)
    assert fed.calls == [(4, ("a",), 2)]
    assert result.cost.client_epochs == 2
    np.testing.assert_allclose(result.model["w"], [1.5 * X + 1 / R2, 1 / R2], rtol=1e-6)
    np.testing.assert_allclose(result.model["b"], [[4.5, 3.5]], rtol=1e-6)
    assert result.model["w"].dtype == np.float32
    assert result.rounds_affected == [2, 3, 4]


def test_recovery_selection_rollback(store: HistoryStore, tmp_path: Path) -> None:
    # t* = 4: restart from θ_3 = w [x, 0], b [[3, 2]]; round 4's stored update of a alone
    # (u dropped) is exact there: w [x + 1, 0], b [[4, 3]]; no client is asked
    fed = Scripted({"a": 0.5, "c": 9.0, "u": 9.0})
    result = unlearn(store, tmp_path, {"u"}, fed, rollback="selection")
    assert fed.calls == []
    assert result.cost.client_epochs == 0
    np.testing.assert_allclose(result.model["w"], [X + 1, 0], rtol=1e-6)
    np.testing.assert_allclose(result.model["b"], [[4, 3]], rtol=1e-6)


def test_recovery_without_an_earlier_selected_round(store: HistoryStore,
                                                    tmp_path: Path) -> None:
    # forget c (first round 1, no selected round <= 1): start from θ_0 = w [0, 0], b [[1, 0]]
    # round 2: (a, c) less c -> a trains (+0.5): w ‖[x, 0]‖ = x along [.5, .5]
    #   -> [x/√2, x/√2]; b √2 along [[.5, .5]] -> [[1, 1]]:  θ̂ w [x/√2, x/√2], b [[2, 1]]
    # round 4: (u, a) both train, weights by the recorded n: a 1/3, u 2/3
    #   fresh mean: (0.5 + 2·0.25) / 3 = 1/3 everywhere
    #   stored mean: w ([1, 0] + 2·[4, 0]) / 3 = [3, 0] (norm 3) -> 3·[1/√2, 1/√2]
    #                b ([[1, 1]] + 0) / 3 (norm √2/3) -> [[1/3, 1/3]]
    fed = Scripted({"a": 0.5, "c": 9.0, "u": 0.25})
    result = unlearn(store, tmp_path, {"c"}, fed)
    assert fed.calls == [(2, ("a",), 2), (4, ("u", "a"), 2)]
    assert result.cost.client_epochs == 2 + 4
    w = (X + 3) / R2
    np.testing.assert_allclose(result.model["w"], [w, w], rtol=1e-6)
    np.testing.assert_allclose(result.model["b"], [[7 / 3, 4 / 3]], rtol=1e-6)


def test_local_epochs_override_and_excluded_clients(store: HistoryStore,
                                                    tmp_path: Path) -> None:
    fed = Scripted({"a": 0.5, "c": 9.0, "u": 0.25})
    request = UnlearningRequest(store=store, forget=frozenset({"c"}),
                                federation=fed,  # type: ignore[arg-type]
                                workdir=str(tmp_path), exclude=frozenset({"u"}))
    get_method("crab", {"local-epochs": 1}).unlearn(request)
    assert fed.calls == [(2, ("a",), 1), (4, ("a",), 1)]


def test_never_contributed(store: HistoryStore, tmp_path: Path) -> None:
    fed = Scripted({})
    result = unlearn(store, tmp_path, {"nobody"}, fed)
    assert fed.calls == [] and result.rounds_affected == []
    np.testing.assert_array_equal(result.model["w"], store.global_model(4)["w"])


def test_no_losses_one_window(tmp_path: Path) -> None:
    # one window of 4 rounds: ⌊0.6·4⌋ = 2 rounds by KL; KL_2 = 1/2 ln(4/3) and KL_4 =
    # KL(softmax([x, 0]) || softmax([x + 9/4, 1/4])) > 0, the others 0 -> rounds 2 and 4
    with build(tmp_path / "run", losses=False) as s:
        sel = select(s, round_ratio=0.6, client_ratio=0.7, loss_drop=0.1)
        assert sel.windows == ((1, 4),)
        assert sel.rounds == (2, 4)


def test_retention_refused(tmp_path: Path) -> None:
    # retain interval 2 keeps rounds 1 and 3; the selected round 2 was not kept
    with build(tmp_path / "run", retain_interval=2) as s:
        fed = Scripted({"a": 0.5})
        with pytest.raises(RetentionError, match="crab selected round 2"):
            unlearn(s, tmp_path, {"u"}, fed)
        assert fed.calls == []

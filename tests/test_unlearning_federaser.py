"""FedEraser: calibrated replay of the retained rounds, checked against hand-worked values."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
    UnlearningRequest,
    UnlearningResult,
)
from fedforget.unlearning.federaser import FedEraser, calibrate, calibration_epochs

Round = dict[str, tuple[int, dict[str, Any]]]  # client id -> (n_k, update)
Fresh = Mapping[tuple[int, str], Mapping[str, Any]]  # (round, client id) -> Û



def build_store(path: Path, theta0: Tensors, rounds: Sequence[Any], **kw: Any) -> HistoryStore:
    """A FedAvg history (``local-epochs`` 2 unless given)."""
    kw.setdefault("local_epochs", 2)
    return _build_store(path, theta0, rounds, **kw)


class ScriptedFederation:
    """Calibration training with scripted fresh updates: client k returns sent + Û[t, k]."""

    def __init__(self, fresh: Fresh, roster: Sequence[str],
                 silent: Sequence[str] = ()) -> None:
        self.cost = Cost()
        self.fresh = dict(fresh)
        self._roster = tuple(sorted(roster))
        self.silent = set(silent)
        self.calls: list[dict[str, Any]] = []

    @property
    def roster(self) -> tuple[str, ...]:
        return self._roster

    def replay(self, **kwargs: Any) -> Tensors:
        raise AssertionError("FedEraser must not replay ordinary rounds")

    def train(self, *, server_round: int, global_model: Mapping[str, np.ndarray],
              clients: Sequence[str], local_epochs: int | None = None, task: str = "train",
              extra_config: Mapping[str, Any] | None = None) -> dict[str, ClientUpdate]:
        self.calls.append({"server_round": server_round, "clients": list(clients),
                           "local_epochs": local_epochs,
                           "global_model": {k: v.copy() for k, v in global_model.items()}})
        self.cost.client_epochs += len(clients) * (local_epochs or 0)
        out = {}
        for cid in clients:
            if cid in self.silent:
                continue
            delta = self.fresh.get((server_round, cid), {k: 0.5 for k in global_model})
            local = {k: (v + np.asarray(delta[k], dtype=np.float64)).astype(np.float32)
                     for k, v in global_model.items()}
            out[cid] = ClientUpdate(cid, local, 1)
        return out

    def evaluate_local(self, model: Tensors, clients: Sequence[str]) -> dict[str, float]:
        raise AssertionError("not used")


def request(store: HistoryStore, forget: set[str], federation: Any,
            tmp_path: Path) -> UnlearningRequest:
    return UnlearningRequest(store=store, forget=frozenset(forget), federation=federation,
                             workdir=str(tmp_path / "work"))


def run(params: Mapping[str, Any], req: UnlearningRequest) -> UnlearningResult:
    return get_method("federaser", params).unlearn(req)


def assert_tensors(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].dtype == np.float32
        np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-5)


# Two rounds, remaining clients a (n=1) and b (n=3), forgotten client u (n=4), Δt = 1.
#   θ_0 = w [0, 0], b [[0, 0]]
#   round 1: U_a = w [4, 0] b [[0, 2]];  U_b = w [0, 4] b [[2, 0]];  U_u = w [8, 8] b [[8, 8]]
#   round 2: U_a = w [3, 4] b [[0, 1]];  U_b = w [0, 2] b [[6, 8]];  U_u = w [1, 1] b [[1, 1]]
#            norms: |U_a.w| = 5, |U_a.b| = 1, |U_b.w| = 2, |U_b.b| = 10
TWO_ROUNDS: list[Round] = [
    {"a": (1, {"w": [4, 0], "b": [[0, 2]]}), "b": (3, {"w": [0, 4], "b": [[2, 0]]}),
     "u": (4, {"w": [8, 8], "b": [[8, 8]]})},
    {"a": (1, {"w": [3, 4], "b": [[0, 1]]}), "b": (3, {"w": [0, 2], "b": [[6, 8]]}),
     "u": (4, {"w": [1, 1], "b": [[1, 1]]})},
]
# Fresh updates in round 2 (directions only matter):
#   Û_a = w [0, 0.5] (|.| 0.5)  b [[0.3, -0.4]] (|.| 0.5)
#   Û_b = w [-6, 8]  (|.| 10)   b [[0, -0.25]]  (|.| 0.25)
FRESH_2: Fresh = {
    (2, "a"): {"w": [0, 0.5], "b": [[0.3, -0.4]]},
    (2, "b"): {"w": [-6, 8], "b": [[0, -0.25]]},
}


def test_registered_under_its_name() -> None:
    assert METHODS["federaser"] is FedEraser


def test_update_rule_against_hand_worked_values(tmp_path: Path) -> None:
    # Prepare
    federation = ScriptedFederation(FRESH_2, roster=["a", "b", "u"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), TWO_ROUNDS) as store:
        # Execute
        result = run({}, request(store, {"u"}, federation, tmp_path))
    # Assert
    # Round 1 = t_0: start θ_0, stored updates of a, b applied as they are, weights 1/4, 3/4:
    #   θ~_1 = w 1/4 [4, 0] + 3/4 [0, 4] = [1, 3];  b 1/4 [[0, 2]] + 3/4 [[2, 0]] = [[1.5, 0.5]]
    # Round 2 calibrated, E = 2, r = 0.5 -> 1 epoch, from θ~_1:
    #   Ũ_a = w 5·[0, 1] = [0, 5];         b 1·[[0.6, -0.8]] = [[0.6, -0.8]]
    #   Ũ_b = w 2·[-0.6, 0.8] = [-1.2, 1.6]; b 10·[[0, -1]] = [[0, -10]]
    #   step = w 1/4 [0, 5] + 3/4 [-1.2, 1.6] = [-0.9, 2.45]
    #          b 1/4 [[0.6, -0.8]] + 3/4 [[0, -10]] = [[0.15, -7.7]]
    #   θ~_2 = w [0.1, 5.45], b [[1.65, -7.2]]
    assert len(federation.calls) == 1
    call = federation.calls[0]
    assert call["server_round"] == 2
    assert call["clients"] == ["a", "b"]
    assert call["local_epochs"] == 1
    assert_tensors(call["global_model"], tensors([1, 3], [[1.5, 0.5]]))
    assert_tensors(result.model, tensors([0.1, 5.45], [[1.65, -7.2]]))
    assert result.rounds_affected == [1, 2]
    assert result.cost.client_epochs == 2  # two clients, one epoch each


def test_the_norm_is_that_of_the_stored_update_of_the_same_round(tmp_path: Path) -> None:
    # Prepare: a alone remains (weight 1), so each calibrated step is ‖U_{t,a}‖ along Û.
    #   round 1: U_a = w [1, 1] b [[1, 1]];  U_u = w [9, 9] b [[9, 9]]   (n = 1 each)
    #   round 2: U_a = w [3, 4] b [[0, 2]];  U_u = w [10, 10] b [[10, 10]]
    #            ‖U_a.w‖ = 5, ‖U_a.b‖ = 2.  The authors' code would measure
    #            θ_{2,a} - θ_2 = U_a - g_2 = U_a - (U_a + U_u)/2 = w [-3.5, -3], b [[-5, -4]]
    #            of norms 4.61 and 6.40 instead.
    #   round 3: U_a = w [0, 7] b [[24, 7]] (‖‖ 7 and 25);  U_u = w [1, 1] b [[1, 1]]
    rounds: list[Round] = [
        {"a": (1, {"w": [1, 1], "b": [[1, 1]]}), "u": (1, {"w": [9, 9], "b": [[9, 9]]})},
        {"a": (1, {"w": [3, 4], "b": [[0, 2]]}), "u": (1, {"w": [10, 10], "b": [[10, 10]]})},
        {"a": (1, {"w": [0, 7], "b": [[24, 7]]}), "u": (1, {"w": [1, 1], "b": [[1, 1]]})},
    ]
    fresh: Fresh = {
        (2, "a"): {"w": [0.25, 0], "b": [[0, -3]]},
        (3, "a"): {"w": [0, -2], "b": [[0.5, 0]]},
    }
    federation = ScriptedFederation(fresh, roster=["a", "u"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), rounds) as store:
        # Execute
        result = run({}, request(store, {"u"}, federation, tmp_path))
    # Assert
    # θ~_1 = θ_0 + U_{1,a} = w [1, 1], b [[1, 1]]
    # round 2 step: w 5·[1, 0] = [5, 0]; b 2·[[0, -1]] = [[0, -2]] -> θ~_2 = w [6, 1], b [[1, -1]]
    # round 3 step: w 7·[0, -1] = [0, -7]; b 25·[[1, 0]] = [[25, 0]] -> w [6, -6], b [[26, -1]]
    sent = [c["global_model"] for c in federation.calls]
    assert [c["server_round"] for c in federation.calls] == [2, 3]
    assert_tensors(sent[0], tensors([1, 1], [[1, 1]]))
    assert_tensors(sent[1], tensors([6, 1], [[1, -1]]))
    step = {k: sent[1][k] - sent[0][k] for k in sent[0]}
    assert np.linalg.norm(step["w"]) == pytest.approx(5.0)  # not 4.61 (next round's model)
    assert np.linalg.norm(step["b"]) == pytest.approx(2.0)  # not 6.40
    assert_tensors(result.model, tensors([6, -6], [[26, -1]]))


def test_first_contribution_in_a_round_not_retained_calibrates_every_replayed_round(
    tmp_path: Path,
) -> None:
    # Prepare: Δt = 2 keeps rounds 1 and 3; u joins in round 2, so the replay starts from
    # θ_1 and round 3 (stored against the contaminated θ_2) is calibrated.
    #   round 1: a (n=1) w [2, 0] b [[0, 2]]               -> θ_1 = w [2, 0], b [[0, 2]]
    #   round 2: a (n=1) w [1, 1] b [[1, 1]];  u (n=1) w [5, 5] b [[5, 5]]
    #   round 3: a (n=1) w [0, 3] b [[4, 0]];  u (n=1) w [1, 1] b [[1, 1]]   ‖U_a‖ = 3 and 4
    # Û_{3,a} = w [1, 0], b [[0, 1]] -> step w [3, 0], b [[0, 4]] -> θ~ = w [5, 0], b [[0, 6]]
    rounds: list[Round] = [
        {"a": (1, {"w": [2, 0], "b": [[0, 2]]})},
        {"a": (1, {"w": [1, 1], "b": [[1, 1]]}), "u": (1, {"w": [5, 5], "b": [[5, 5]]})},
        {"a": (1, {"w": [0, 3], "b": [[4, 0]]}), "u": (1, {"w": [1, 1], "b": [[1, 1]]})},
    ]
    federation = ScriptedFederation({(3, "a"): {"w": [1, 0], "b": [[0, 1]]}}, roster=["a", "u"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), rounds,
                     retain_interval=2) as store:
        result = run({}, request(store, {"u"}, federation, tmp_path))
    assert [c["server_round"] for c in federation.calls] == [3]
    assert_tensors(federation.calls[0]["global_model"], tensors([2, 0], [[0, 2]]))
    assert_tensors(result.model, tensors([5, 0], [[0, 6]]))
    assert result.rounds_affected == [2, 3]


def test_a_coarser_retain_interval_replays_fewer_rounds(tmp_path: Path) -> None:
    # Δt = 2 in the history; asking Δt = 4 replays rounds 1 and 5 only (round 1 without
    # client work, since u took part from round 1).
    one: Round = {"a": (1, {"w": [1, 0], "b": [[0, 1]]}), "u": (1, {"w": [0, 1], "b": [[1, 0]]})}
    federation = ScriptedFederation({}, roster=["a", "u"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), [one] * 6,
                     retain_interval=2) as store:
        result = run({"retain-interval": 4}, request(store, {"u"}, federation, tmp_path))
    assert [c["server_round"] for c in federation.calls] == [5]
    assert result.rounds_affected == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("params", "run_epochs", "expected"),
    [
        ({}, 2, 1),  # 0.5 · 2 = 1
        ({}, 3, 2),  # 0.5 · 3 = 1.5 -> 2 (half up)
        ({"local-epochs": 5}, 3, 3),  # 0.5 · 5 = 2.5 -> 3 (Python's round would give 2)
        ({"calibration-ratio": 0.1}, 3, 1),  # 0.3 -> 0 -> at least 1
        ({"calibration-ratio": 1.0}, 3, 3),
        ({"calibration-ratio": 0.25, "local-epochs": 8}, 3, 2),
    ],
)
def test_clients_are_asked_for_r_times_e_epochs(
    tmp_path: Path, params: dict[str, Any], run_epochs: int, expected: int
) -> None:
    federation = ScriptedFederation(FRESH_2, roster=["a", "b", "u"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), TWO_ROUNDS,
                     local_epochs=run_epochs) as store:
        run(params, request(store, {"u"}, federation, tmp_path))
    assert [c["local_epochs"] for c in federation.calls] == [expected]


def test_calibration_epochs_rounding() -> None:
    assert [calibration_epochs(0.5, e) for e in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]


def test_a_zero_fresh_update_leaves_that_tensor_unchanged() -> None:
    assert not np.any(calibrate(np.array([3.0, 4.0]), np.zeros(2)))
    np.testing.assert_allclose(calibrate(np.array([3.0, 4.0]), np.array([0.0, 2.0])), [0, 5])


def test_a_silent_client_is_left_out_and_the_rest_renormalised(tmp_path: Path) -> None:
    # b does not reply in round 2: a's calibrated update alone, weight 1:
    # θ~_2 = θ~_1 + Ũ_a = w [1, 3] + [0, 5] = [1, 8], b [[1.5, 0.5]] + [[0.6, -0.8]] = [[2.1, -0.3]]
    federation = ScriptedFederation(FRESH_2, roster=["a", "b", "u"], silent=["b"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), TWO_ROUNDS) as store:
        result = run({}, request(store, {"u"}, federation, tmp_path))
    assert_tensors(result.model, tensors([1, 8], [[2.1, -0.3]]))
    assert any("no calibration reply from ['b']" in note for note in result.notes)


def test_forgetting_a_client_who_never_took_part_changes_nothing(tmp_path: Path) -> None:
    federation = ScriptedFederation(FRESH_2, roster=["a", "b", "u"])
    with build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), TWO_ROUNDS) as store:
        result = run({}, request(store, {"nobody"}, federation, tmp_path))
        assert_tensors(result.model, store.global_model(2))
    assert result.rounds_affected == []
    assert federation.calls == []


def test_a_retain_interval_not_a_multiple_of_the_historys_is_refused(tmp_path: Path) -> None:
    # Prepare: the history keeps rounds 1, 3, 5; Δt = 3 would need rounds 1 and 4.
    one: Round = {"a": (1, {"w": [1, 0], "b": [[0, 1]]}), "u": (1, {"w": [0, 1], "b": [[1, 0]]})}
    federation = ScriptedFederation({}, roster=["a", "u"])
    message = (
        "federaser: retain-interval = 3 is not a multiple of the history's retain interval "
        "2 (it keeps rounds 1, 3, 5, ...); rounds [4] would be needed but were not "
        "retained; expected a multiple of 2, or 0 to use the history's"
    )
    with (
        build_store(tmp_path / "run", tensors([0, 0], [[0, 0]]), [one] * 5,
                    retain_interval=2) as store,
        pytest.raises(RetentionError, match=re.escape(message)),
    ):
        run({"retain-interval": 3}, request(store, {"u"}, federation, tmp_path))
    assert federation.calls == []  # refused before any client work


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"calibration-ratio": 1.5},
         "calibration-ratio = 1.5 is out of range; expected > 0 and <= 1"),
        ({"calibration-ratio": 0},
         "calibration-ratio = 0.0 is out of range; expected > 0 and <= 1"),
        ({"retain-interval": -1}, "retain-interval = -1 is out of range; expected >= 0"),
        ({"local-epochs": -2}, "local-epochs = -2 is out of range; expected >= 0"),
        ({"ratio": 0.5}, "unknown parameter 'ratio'; allowed: retain-interval, "
                         "calibration-ratio, local-epochs"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method("federaser", params)

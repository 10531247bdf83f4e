"""Tests of fedforget.evaluation.suite: every figure of the protocol on constant models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedforget.data import ArrayDataset
from fedforget.evaluation import (
    EvaluationError,
    ShadowAttack,
    accuracy_trace,
    evaluate_unlearning,
    run_shadow_attack,
    shadow_halves,
)
from fedforget.task import load_test_set, new_model


def constant(bias: list[float]) -> dict[str, np.ndarray]:
    """Linear(1, 2) with zero weight: softmax(bias) on every input (the trigger included)."""
    return {"weight": np.zeros((2, 1), np.float32), "bias": np.array(bias, np.float32)}


def labelled(labels: list[int], name: str) -> ArrayDataset:
    return ArrayDataset(x=np.zeros((len(labels), 1), np.float32), y=np.array(labels),
                        num_classes=2, name=name)


LN3 = math.log(3.0)
ORIGINAL = constant([0.0, LN3])  # (1/4, 3/4): predicts 1
UNLEARNED = constant([math.log(2.0), 0.0])  # (2/3, 1/3): predicts 0
RETRAINED = constant([LN3, 0.0])  # (3/4, 1/4): predicts 0


def run(**extra: object) -> dict[str, object]:
    inputs: dict[str, object] = {
        "model": nn.Linear(1, 2),
        "original": ORIGINAL,
        "unlearned": UNLEARNED,
        "retrained": RETRAINED,
        "test_set": labelled([1, 1, 1, 0], "test"),
        "forgotten": labelled([1, 1], "forgotten"),
        "holdout": labelled([0, 1], "holdout"),
    }
    return evaluate_unlearning(**(inputs | extra))  # type: ignore[arg-type]


def test_every_figure_by_hand() -> None:
    # Execute
    report = run(backdoor_target=1, client_accuracy_before={"c1": 0.75, "c2": 0.5},
                 client_accuracy_after={"c1": 0.5, "c2": 0.75})
    # Assert: accuracies of "always 1" / "always 0" on labels 1110, 11, and the one
    # triggered test example (label 0 -> relabelled 1)
    assert report["test_accuracy"] == {"original": 0.75, "unlearned": 0.25, "retrained": 0.25}
    assert report["forgotten_accuracy"] == {"original": 1.0, "unlearned": 0.0, "retrained": 0.0}
    assert report["backdoor_success"] == {"original": 1.0, "unlearned": 0.0, "retrained": 0.0}
    # Loss attack. Original: members' losses ln(4/3), holdout ln 4 and ln(4/3): per member one
    # win, one tie -> 3/4. Retrained: members ln 4, holdout ln(4/3), ln 4 -> one loss, one
    # tie -> 1/4; unlearned likewise (ln 3 against ln(3/2), ln 3). Confidence is constant: 1/2.
    assert report["mia_loss_auc"] == pytest.approx(
        {"original": 0.75, "unlearned": 0.25, "retrained": 0.25}
    )
    assert report["mia_confidence_auc"] == {"original": 0.5, "unlearned": 0.5, "retrained": 0.5}
    # Parameters: only the biases differ: (-ln3, ln3) and (ln2 - ln3, 0)
    assert report["l2_to_retrained"] == pytest.approx(
        {"original": math.sqrt(2.0) * LN3, "unlearned": math.log(1.5)}, rel=1e-6
    )
    # (0, ln3) is orthogonal to (ln3, 0); (ln2, 0) is parallel to it
    assert report["cosine_to_retrained"] == pytest.approx(
        {"original": 1.0, "unlearned": 0.0}, abs=1e-7
    )
    # KL((1/4, 3/4) || (3/4, 1/4)) = 1/4 ln(1/3) + 3/4 ln 3 = 1/2 ln 3;
    # KL((2/3, 1/3) || (3/4, 1/4)) = 2/3 ln(8/9) + 1/3 ln(4/3)
    assert report["kl_to_retrained"] == pytest.approx(
        {"original": 0.5 * LN3, "unlearned": 2 / 3 * math.log(8 / 9) + 1 / 3 * math.log(4 / 3)},
        rel=1e-5,
    )
    # JS original: M = (1/2, 1/2), both halves equal 1/4 ln(1/2) + 3/4 ln(3/2)
    assert report["js_to_retrained"]["original"] == pytest.approx(  # type: ignore[index]
        0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-5
    )
    impact = report["client_impact"]
    assert isinstance(impact, dict)
    assert impact["worst"] == [{"client": "c1", "change": -0.25}, {"client": "c2", "change": 0.25}]
    assert json.loads(json.dumps(report)) == report  # JSON-ready


def test_optional_parts_are_none() -> None:
    report = run()
    assert report["backdoor_success"] is None
    assert report["shadow_attack"] is None
    assert report["client_impact"] is None
    assert report["client_accuracy"] is None


def test_without_forgotten_data_its_figures_are_none() -> None:
    # Execute: no members at all, then members but no non-members
    none = run(forgotten=None)
    empty_holdout = run(holdout=labelled([], "holdout"))
    # Assert: what needs members is None; what needs only members is still measured
    for key in ("forgotten_accuracy", "mia_loss_auc", "mia_confidence_auc", "shadow_attack"):
        assert none[key] is None
    for key in ("mia_loss_auc", "mia_confidence_auc", "shadow_attack"):
        assert empty_holdout[key] is None
    assert empty_holdout["forgotten_accuracy"] == {
        "original": 1.0, "unlearned": 0.0, "retrained": 0.0
    }
    assert none["test_accuracy"] == {"original": 0.75, "unlearned": 0.25, "retrained": 0.25}


class MaxConfidence:
    """A stand-in attack model: membership probability = the top softmax probability."""

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return np.stack([1.0 - features[:, 0], features[:, 0]], axis=1)


def test_the_shadow_attack_is_aimed_at_each_model_with_the_forgotten_data() -> None:
    # Prepare: top probabilities 3/4 (original, retrained) and 2/3 (unlearned); threshold 0.7
    shadow = ShadowAttack(classifier=MaxConfidence(), num_classes=2, threshold=0.7)
    # Execute
    report = run(shadow=shadow)
    # Assert: 3/4 >= 0.7 calls all 2 members and 2 non-members members: precision 2/4,
    # recall 1; 2/3 < 0.7 calls none: 0 and 0. Constant scores tie: AUC 1/2 for all.
    assert report["shadow_attack"] == {
        "original": {"precision": 0.5, "recall": 1.0, "auc": 0.5},
        "unlearned": {"precision": 0.0, "recall": 0.0, "auc": 0.5},
        "retrained": {"precision": 0.5, "recall": 1.0, "auc": 0.5},
    }


def test_client_accuracies_are_reported_as_given() -> None:
    report = run(client_accuracy_before={"c1": 0.75, "c2": 0.5},
                 client_accuracy_after={"c1": 0.5, "c2": 0.75})
    assert report["client_accuracy"] == {"original": {"c1": 0.75, "c2": 0.5},
                                         "unlearned": {"c1": 0.5, "c2": 0.75}}


biases = st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=2, max_size=2)


@settings(max_examples=25, deadline=None)
@given(original=biases, retrained=biases)
def test_a_model_equal_to_the_retrained_one_is_at_distance_zero_and_scores_the_same(
    original: list[float], retrained: list[float]
) -> None:
    # Prepare: the unlearned model is a copy of the retrained one (a non-zero one: the
    # cosine needs a direction)
    reference = constant([b if b != 0.0 else 1.0 for b in retrained])
    shadow = ShadowAttack(classifier=MaxConfidence(), num_classes=2)
    # Execute
    report = evaluate_unlearning(
        model=nn.Linear(1, 2), original=constant(original),
        unlearned={k: v.copy() for k, v in reference.items()}, retrained=reference,
        test_set=labelled([1, 1, 1, 0], "test"), forgotten=labelled([1, 1], "forgotten"),
        holdout=labelled([0, 1], "holdout"), shadow=shadow,
    )
    # Assert
    assert report["l2_to_retrained"]["unlearned"] == 0.0  # type: ignore[index]
    assert report["kl_to_retrained"]["unlearned"] == 0.0  # type: ignore[index]
    assert report["js_to_retrained"]["unlearned"] == 0.0  # type: ignore[index]
    assert report["cosine_to_retrained"]["unlearned"] == pytest.approx(0.0, abs=1e-12)  # type: ignore[index]
    for key in ("test_accuracy", "forgotten_accuracy", "mia_loss_auc", "mia_confidence_auc",
                "shadow_attack"):
        figures = report[key]
        assert isinstance(figures, dict)
        assert figures["unlearned"] == figures["retrained"], key


def test_the_cosine_distance_of_an_all_zero_model_is_none() -> None:
    report = run(original=constant([0.0, 0.0]))
    assert report["cosine_to_retrained"] == {"original": None, "unlearned": 0.0}
    assert report["l2_to_retrained"]["original"] == pytest.approx(LN3, rel=1e-6)  # type: ignore[index]


def test_accuracy_trace_by_hand() -> None:
    # Prepare: "always 1" then "always 0" on labels 1 1 1 0
    snapshots = [(4, ORIGINAL), (7, UNLEARNED)]
    # Execute
    trace = accuracy_trace(nn.Linear(1, 2), snapshots, labelled([1, 1, 1, 0], "test"))
    # Assert
    assert trace == [{"round": 4, "test_accuracy": 0.75}, {"round": 7, "test_accuracy": 0.25}]
    assert accuracy_trace(nn.Linear(1, 2), [], labelled([1], "test")) == []


@pytest.mark.parametrize("n", [2, 7, 10])
def test_shadow_halves_split_the_test_set_in_two(n: int) -> None:
    # Prepare: features carry the example's index, so the halves can be traced back
    data = ArrayDataset(x=np.arange(n, dtype=np.float32).reshape(n, 1), y=np.zeros(n, np.int64),
                        num_classes=2, name="test")
    # Execute
    train, out = shadow_halves(data, seed=5)
    again = shadow_halves(data, seed=5)
    # Assert: floor(n/2) and ceil(n/2) examples, disjoint, together the whole set, and
    # the same split for the same seed
    assert (len(train), len(out)) == (n // 2, n - n // 2)
    ids_train, ids_out = set(train.x[:, 0].tolist()), set(out.x[:, 0].tolist())
    assert not ids_train & ids_out
    assert ids_train | ids_out == set(range(n))
    assert np.array_equal(again[0].x, train.x) and np.array_equal(again[1].x, out.x)


def test_shadow_halves_refuse_a_single_example() -> None:
    with pytest.raises(EvaluationError, match="has 1 examples; the shadow attack needs at least 2"):
        shadow_halves(labelled([1], "test"), seed=0)


def test_the_runs_shadow_attack_is_deterministic_in_the_run_seed(tmp_path: Path) -> None:
    # Prepare: a small synthetic run's configuration and a target of its architecture
    cfg = small_config()
    test = load_test_set(cfg)
    members, non_members = test.subset(np.arange(0, 20)), test.subset(np.arange(20, 40))
    # Execute: two attackers fitted independently, aimed at the same target
    first = run_shadow_attack(cfg, test, epochs=3).attack(new_model(cfg), members, non_members)
    second = run_shadow_attack(cfg, test, epochs=3).attack(new_model(cfg), members, non_members)
    # Assert
    assert first == second
    for value in (first.precision, first.recall, first.auc):
        assert 0.0 <= value <= 1.0


def test_client_accuracies_come_in_pairs() -> None:
    with pytest.raises(EvaluationError, match="given only before unlearning; expected both"):
        run(client_accuracy_before={"c1": 0.5})

"""Tests of fedforget.evaluation.membership: exact AUC, threshold and shadow-model attacks."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedforget.data import ArrayDataset
from fedforget.evaluation import (
    EvaluationError,
    ShadowAttack,
    confidence_threshold_auc,
    loss_threshold_auc,
    per_example_loss,
    precision_recall,
    roc_auc,
    shadow_attack,
)
from fedforget.models import build_model
from fedforget.training import train_local

# ------------------------------------------------------------------ exact AUC


@pytest.mark.parametrize(
    ("pos", "neg", "expected"),
    [
        ([3.0, 2.0], [1.0, 2.0], 3.5 / 4),  # pairs: 1, 1, 1, tie 1/2
        ([0.9, 0.4, 0.6], [0.5, 0.1], 5 / 6),  # 2 + 1 + 2 wins of 6 pairs
        ([1.0], [2.0], 0.0),
        ([5.0, 5.0], [5.0], 0.5),  # all ties
        ([2.0, 3.0], [0.0, 1.0], 1.0),
    ],
)
def test_roc_auc_hand_worked(pos: list[float], neg: list[float], expected: float) -> None:
    assert roc_auc(np.array(pos), np.array(neg)) == pytest.approx(expected, abs=1e-15)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=12),
    st.lists(st.integers(-3, 3), min_size=1, max_size=12),
)
def test_roc_auc_is_the_pair_count_and_swaps_to_one_minus(pos: list[int], neg: list[int]) -> None:
    # Prepare: the definition, pair by pair
    wins = sum((s > t) + 0.5 * (s == t) for s in pos for t in neg)
    # Execute
    auc = roc_auc(np.array(pos), np.array(neg))
    # Assert
    assert auc == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert auc + roc_auc(np.array(neg), np.array(pos)) == pytest.approx(1.0, abs=1e-12)


def test_roc_auc_refuses_empty_and_nan() -> None:
    with pytest.raises(EvaluationError, match="no negative scores; expected at least one"):
        roc_auc(np.array([1.0]), np.array([]))
    with pytest.raises(EvaluationError, match="1 positive scores are NaN"):
        roc_auc(np.array([1.0, math.nan]), np.array([0.0]))


def test_precision_recall_by_hand() -> None:
    # Prepare: guesses 1 1 1 0 0, truth 1 0 1 1 0 -> TP 2, FP 1, FN 1
    guesses = np.array([1, 1, 1, 0, 0], bool)
    truth = np.array([1, 0, 1, 1, 0], bool)
    # Execute / Assert
    assert precision_recall(guesses, truth) == pytest.approx((2 / 3, 2 / 3))
    assert precision_recall(np.zeros(3, bool), np.ones(3, bool)) == (0.0, 0.0)


# ---------------------------------------------------------- threshold attacks


def constant_model() -> nn.Module:
    """softmax = (1/4, 3/4) on every input: loss ln 4 for label 0, ln(4/3) for label 1."""
    model = nn.Linear(1, 2)
    nn.init.zeros_(model.weight)
    model.bias.data[:] = model.bias.data.new_tensor([0.0, math.log(3.0)])
    return model


def labelled(labels: list[int]) -> ArrayDataset:
    return ArrayDataset(
        x=np.zeros((len(labels), 1), np.float32), y=np.array(labels), num_classes=2, name="t"
    )


def test_per_example_loss_by_hand() -> None:
    losses = per_example_loss(constant_model(), labelled([0, 1, 1]))
    assert losses == pytest.approx([math.log(4.0), math.log(4 / 3), math.log(4 / 3)], rel=1e-6)


def test_loss_threshold_auc_by_hand() -> None:
    # Prepare: members' losses ln(4/3), ln 4; the non-member's ln 4
    members, non_members = labelled([1, 0]), labelled([0])
    # Execute
    auc = loss_threshold_auc(constant_model(), members, non_members)
    conf = confidence_threshold_auc(constant_model(), members, non_members)
    # Assert: one win, one tie -> (1 + 1/2) / 2; the confidence is 3/4 everywhere -> all ties
    assert auc == pytest.approx(0.75)
    assert conf == pytest.approx(0.5)


def test_loss_threshold_auc_refuses_empty_data() -> None:
    with pytest.raises(EvaluationError, match="data set 't' has no examples"):
        loss_threshold_auc(constant_model(), labelled([1]), labelled([]))


# ------------------------------------------------- an overfitting setting


class NoisyTask(NamedTuple):
    retain: ArrayDataset  # the data that stays
    forgotten: ArrayDataset  # the members: trained on by the original model only
    holdout: ArrayDataset  # never trained on
    shadow_train: ArrayDataset
    shadow_out: ArrayDataset


FEATURES, CLASSES = 10, 4


def noisy_task(seed: int) -> NoisyTask:
    """Gaussian clusters (sigma 1) with half the labels drawn at random: only memorised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, FEATURES))
    sizes = [100, 100, 1000, 200, 200]
    n = sum(sizes)
    y = rng.integers(0, CLASSES, n)
    x = centres[y] + rng.standard_normal((n, FEATURES))
    noisy = rng.random(n) < 0.5
    y[noisy] = rng.integers(0, CLASSES, int(noisy.sum()))
    pool = ArrayDataset(x=x, y=y, num_classes=CLASSES, name="noisy")
    bounds = np.cumsum([0, *sizes])
    parts = [pool.subset(np.arange(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return NoisyTask(*parts)


def overfit(data: ArrayDataset, seed: int) -> nn.Module:
    """A 64-unit MLP, full-batch SGD for 500 epochs: it memorises its training set."""
    model = build_model("mlp", input_shape=(FEATURES,), num_classes=CLASSES, seed=seed,
                        hidden_size=64)
    train_local(model, data, epochs=500, learning_rate=0.5, batch_size=len(data), seed=seed)
    return model


def union(a: ArrayDataset, b: ArrayDataset) -> ArrayDataset:
    return ArrayDataset(x=np.concatenate([a.x, b.x]), y=np.concatenate([a.y, b.y]),
                        num_classes=a.num_classes, name="union")


class Trained(NamedTuple):
    task: NoisyTask
    original: nn.Module  # trained on retain + forgotten
    retrained: nn.Module  # trained on retain alone


@pytest.fixture(scope="module", params=[pytest.param(s, marks=pytest.mark.slow) for s in (0, 1, 2)])
def trained(request: pytest.FixtureRequest) -> Trained:
    seed = int(request.param)
    task = noisy_task(seed)
    return Trained(
        task, overfit(union(task.retain, task.forgotten), seed), overfit(task.retain, seed)
    )


def test_loss_attack_detects_memorised_data_and_not_retrained(trained: Trained) -> None:
    # Prepare
    task = trained.task
    # Execute
    original_auc = loss_threshold_auc(trained.original, task.forgotten, task.holdout)
    retrained_auc = loss_threshold_auc(trained.retrained, task.forgotten, task.holdout)
    # Assert: members vs non-members are exchangeable for the retrained model, so its AUC is
    # 0.5 up to a null spread of sqrt((100 + 1000 + 1) / (12 * 100 * 1000)) = 0.030;
    # 0.15 is five of those.
    assert original_auc > 0.7
    assert abs(retrained_auc - 0.5) < 0.15


def shadow_result(target: nn.Module, task: NoisyTask, seed: int) -> tuple[float, float, float]:
    result = shadow_attack(
        target,
        task.forgotten,
        task.holdout.subset(np.arange(len(task.forgotten))),  # as many non-members as members
        shadow_train=task.shadow_train,
        shadow_out=task.shadow_out,
        build_shadow=lambda: build_model("mlp", input_shape=(FEATURES,), num_classes=CLASSES,
                                         seed=seed + 1, hidden_size=64),
        train_shadow=lambda model, data: train_local(
            model, data, epochs=500, learning_rate=0.5, batch_size=len(data), seed=seed + 1
        ),
        seed=seed,
    )
    return result.precision, result.recall, result.auc


@pytest.mark.slow
def test_shadow_attack_separates_only_the_memorised_data() -> None:
    # Prepare
    seed = 0
    task = noisy_task(seed)
    original = overfit(union(task.retain, task.forgotten), seed)
    retrained = overfit(task.retain, seed)
    # Execute
    on_original = shadow_result(original, task, seed)
    on_retrained = shadow_result(retrained, task, seed)
    again = shadow_result(retrained, task, seed)
    # Assert: the attack learnt on the shadow transfers to the memorising target only;
    # precision is out of 200 balanced examples, so chance is 0.5
    assert on_original[2] > 0.55
    assert on_original[2] > on_retrained[2]
    assert abs(on_retrained[2] - 0.5) < 0.15
    assert again == on_retrained  # deterministic


def test_shadow_attack_refuses_a_shadow_with_other_classes() -> None:
    # Prepare: a 3-class shadow against the 2-class target
    data = labelled([0, 1])
    # Execute / Assert
    with pytest.raises(EvaluationError, match="shadow model predicts 3 classes and the target 2"):
        shadow_attack(
            constant_model(), data, data, shadow_train=data, shadow_out=data,
            build_shadow=lambda: nn.Linear(1, 3), train_shadow=lambda model, d: None, seed=0,
        )


# ------------------------------------------------- a fitted attack, aimed again


def confident_on_ones() -> nn.Module:
    """logits (0, 4x): softmax (1/2, 1/2) at x = 0, (1/(1+e^4), e^4/(1+e^4)) at x = 1."""
    model = nn.Linear(1, 2)
    nn.init.zeros_(model.bias)
    model.weight.data[:] = model.weight.data.new_tensor([[0.0], [4.0]])
    return model


def uniform_model() -> nn.Module:
    """softmax (1/2, 1/2) everywhere."""
    model = nn.Linear(1, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def at(x: float, n: int) -> ArrayDataset:
    return ArrayDataset(x=np.full((n, 1), x, np.float32), y=np.zeros(n, np.int64), num_classes=2,
                        name=f"x={x}")


def test_a_fitted_shadow_attack_trains_the_shadow_once_and_aims_at_any_target() -> None:
    # Prepare: the shadow is confident on its "in" half (x = 1) and uniform on its "out"
    # half (x = 0): two separable feature points, (0.982, 0.018) in and (1/2, 1/2) out.
    built: list[nn.Module] = []
    trained: list[int] = []

    def build() -> nn.Module:
        built.append(confident_on_ones())
        return built[-1]

    # Execute
    attack = ShadowAttack.fit(
        shadow_train=at(1.0, 6), shadow_out=at(0.0, 6), build_shadow=build,
        train_shadow=lambda model, data: trained.append(len(data)), seed=0,
    )
    memorising = attack.attack(confident_on_ones(), at(1.0, 4), at(0.0, 4))
    blind = attack.attack(uniform_model(), at(1.0, 4), at(0.0, 4))
    # Assert: one shadow, trained once on its 6 "in" examples. With balanced classes of
    # two points the unpenalised intercept puts the boundary between them, so a target
    # that is confident on its members calls exactly them members (precision = recall =
    # AUC = 1); a target uniform everywhere shows the "out" point only: no member called
    # (precision and recall 0 by convention), every score tied (AUC 1/2).
    assert len(built) == 1 and trained == [6]
    assert attack.num_classes == 2
    assert (memorising.precision, memorising.recall, memorising.auc) == (1.0, 1.0, 1.0)
    assert (blind.precision, blind.recall, blind.auc) == (0.0, 0.0, 0.5)


def test_shadow_attack_is_fit_then_attack() -> None:
    # Prepare
    kwargs = dict(shadow_train=at(1.0, 6), shadow_out=at(0.0, 6),
                  build_shadow=confident_on_ones, train_shadow=lambda model, data: None, seed=3)
    # Execute
    once = shadow_attack(confident_on_ones(), at(1.0, 3), at(0.0, 5), **kwargs)  # type: ignore[arg-type]
    fitted = ShadowAttack.fit(**kwargs).attack(  # type: ignore[arg-type]
        confident_on_ones(), at(1.0, 3), at(0.0, 5)
    )
    # Assert
    assert once == fitted


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, math.nan])
def test_a_threshold_outside_the_open_unit_interval_is_refused_before_any_training(
    threshold: float,
) -> None:
    def build() -> nn.Module:
        raise AssertionError("nothing may be built for a refused threshold")

    expected = r"threshold = .* is out of range; expected 0 < t < 1"
    with pytest.raises(EvaluationError, match=expected):
        ShadowAttack.fit(shadow_train=at(1.0, 2), shadow_out=at(0.0, 2), build_shadow=build,
                         train_shadow=lambda model, data: None, seed=0, threshold=threshold)

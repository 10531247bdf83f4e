"""Bootstrap intervals, noise tests, balanced sets, and the attacks' precision at chance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_evaluation_membership import noisy_task, overfit, union
from torch import nn

from fedforget.data import ArrayDataset
from fedforget.evaluation import (
    EvaluationError,
    OriginalModelAttack,
    balanced,
    evaluate_unlearning,
    paired_comparison,
    percentile_interval,
    roc_auc,
    stratified_bootstrap,
    within_noise_across_seeds,
)
from fedforget.models import build_model


def test_a_perfectly_separated_auc_has_a_degenerate_interval() -> None:
    pos, neg = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0])
    samples = stratified_bootstrap({"auc": lambda i, j: roc_auc(pos[i], neg[j])}, 3, 2,
                                   resamples=50, seed=1)
    interval = percentile_interval(samples["auc"], 1.0)
    assert (interval.low, interval.high) == (1.0, 1.0)


def test_resamples_are_stratified_and_seeded() -> None:
    # Each resample draws 4 members from 0..3 and 2 non-members from 0..1 (sizes fixed).
    seen: list[tuple[int, int]] = []

    def record(i: np.ndarray, j: np.ndarray) -> float:
        seen.append((len(i), len(j)))
        assert i.max() < 4 and j.max() < 2
        return float(i.sum() + 10 * j.sum())

    a = stratified_bootstrap({"s": record}, 4, 2, resamples=20, seed=7)
    b = stratified_bootstrap({"s": record}, 4, 2, resamples=20, seed=7)
    assert set(seen) == {(4, 2)}
    np.testing.assert_array_equal(a["s"], b["s"])
    with pytest.raises(EvaluationError, match="0 members and 2 non-members"):
        stratified_bootstrap({"s": record}, 0, 2)


def test_paired_comparison_of_identical_samples_is_within_noise() -> None:
    samples = np.linspace(0.4, 0.6, 101)
    same = paired_comparison(samples, samples, 0.0)
    shifted = paired_comparison(samples + 0.2, samples, 0.2)
    assert same.within_noise and (same.low, same.high) == (0.0, 0.0)
    assert not shifted.within_noise and shifted.low == pytest.approx(0.2)


def test_within_noise_across_seeds_by_hand() -> None:
    # a = 1, 2, 3 (mean 2, s² 1), b = 1, 1, 1: d = 1, SE = sqrt(1/3) = 0.5774, 2 SE = 1.155
    wide = within_noise_across_seeds([1, 2, 3], [1, 1, 1])
    # a = 3, 3.1, 2.9 (s² 0.01), b = 1, 1.1, 0.9 (s² 0.01): d = 2, SE = sqrt(0.02/3) = 0.0816
    tight = within_noise_across_seeds([3, 3.1, 2.9], [1, 1.1, 0.9])
    assert wide.within_noise and wide.difference == pytest.approx(1.0)
    assert wide.high == pytest.approx(1 + 2 * math.sqrt(1 / 3))
    assert not tight.within_noise and tight.low == pytest.approx(2 - 2 * math.sqrt(0.02 / 3))


def test_balanced_subsamples_the_larger_side() -> None:
    keep_in, keep_out = balanced(10, 4, seed=0)
    assert len(keep_in) == len(keep_out) == 4
    assert list(keep_out) == [0, 1, 2, 3] and len(set(keep_in)) == 4 and keep_in.max() < 10
    assert np.array_equal(balanced(10, 4, seed=0)[0], keep_in)


def test_original_model_attack_is_at_chance_on_a_model_that_never_saw_the_members() -> None:
    # Prepare: the original memorises retain + forgotten; the retrained model never saw the
    # forgotten examples nor the held-out ones, so for it they are exchangeable
    task = noisy_task(0)
    original = overfit(union(task.retain, task.forgotten), 0)
    retrained = overfit(task.retain, 0)
    attack = OriginalModelAttack.fit_on_original(original=original, members=task.retain,
                                                 non_members=task.shadow_out, seed=0)
    non_members = task.holdout.subset(np.arange(len(task.forgotten)))  # 100 and 100

    # Execute
    blind = attack.attack(retrained, task.forgotten, non_members)
    seeing = attack.attack(original, task.forgotten, non_members)

    # Assert: precision of balanced calls on exchangeable examples is 1/2 up to its spread
    # (about sqrt(0.25 / 100) = 0.05 for ~100 calls: 0.15 is three of those); the same
    # attack finds the members of the model that memorised them
    assert abs(blind.precision - 0.5) < 0.15
    assert abs(blind.auc - 0.5) < 0.15
    assert seeing.auc > 0.6 and seeing.precision > blind.precision


def _constant(bias: list[float]) -> dict[str, np.ndarray]:
    return {"weight": np.zeros((2, 1), np.float32), "bias": np.array(bias, np.float32)}


def _data(labels: list[int], name: str) -> ArrayDataset:
    return ArrayDataset(x=np.zeros((len(labels), 1), np.float32), y=np.array(labels),
                        num_classes=2, name=name)


def test_suite_reports_intervals_noise_and_the_poisoned_subset_apart() -> None:
    # Prepare: constant models (softmax(bias) on every input); unlearned = retrained
    original, same = _constant([0.0, math.log(3.0)]), _constant([math.log(3.0), 0.0])
    members = _data([1, 1, 0, 0], "forgotten")   # the last two "poisoned"
    holdout = _data([0, 1, 1, 0], "holdout")
    poisoned_out = _data([0, 0], "poisoned-holdout")

    # Execute
    report = evaluate_unlearning(
        model=nn.Linear(1, 2), original=original, unlearned=same, retrained=same,
        test_set=_data([1, 0], "test"), forgotten=members, holdout=holdout,
        forgotten_poisoned=np.array([False, False, True, True]), poisoned_holdout=poisoned_out,
        resamples=200, seed=0)

    # Assert: the same model is within noise of itself, with a zero-width difference
    versus = report["mia_vs_retrained"]["loss_auc"]["unlearned"]  # type: ignore[index]
    assert versus["within_noise"] and versus["low"] == versus["high"] == 0.0
    intervals = report["mia_intervals"]["loss_auc"]  # type: ignore[index]
    assert set(intervals) == {"original", "unlearned", "retrained"}
    assert intervals["original"]["low"] <= intervals["original"]["estimate"] <= \
        intervals["original"]["high"]
    # the clean members (labels 1, 1) score 3/4 under the original (predicts 1), the
    # poisoned ones (labels 0, 0) 1/4: clean accuracy 1, poisoned 0
    assert report["forgotten_accuracy_clean"]["original"] == 1.0  # type: ignore[index]
    assert report["forgotten_accuracy_poisoned"]["original"] == 0.0  # type: ignore[index]
    # poisoned members (loss ln 4) against poisoned non-members (ln 4): all ties, AUC 1/2
    assert report["mia_loss_auc_poisoned"]["original"] == 0.5  # type: ignore[index]
    assert report["kl_to_retrained_forgotten"]["unlearned"] == 0.0  # type: ignore[index]
    assert report["mia_sizes"] == {"members": 4, "non_members": 4}
    assert build_model  # the model registry is importable alongside

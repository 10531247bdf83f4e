"""Tests of fedforget.evaluation.divergence: L2, cosine, KL and JS, worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedforget.data import ArrayDataset
from fedforget.evaluation import (
    EvaluationError,
    cosine_distance,
    js_divergence,
    kl_divergence,
    l2_distance,
    prediction_divergence,
)


def constant_tensors(bias: list[float]) -> dict[str, np.ndarray]:
    """A Linear(1, 2) with zero weight: its softmax is softmax(bias) on every input."""
    return {"weight": np.zeros((2, 1), np.float32), "bias": np.array(bias, np.float32)}


def test_l2_distance_over_all_tensors() -> None:
    # Prepare: differences (3, 4) in "w" and 0 in "b"
    a = {"w": np.array([1.0, 2.0]), "b": np.array([2.0])}
    b = {"w": np.array([4.0, 6.0]), "b": np.array([2.0])}
    # Execute
    distance = l2_distance(a, b)
    # Assert: sqrt(3^2 + 4^2) = 5
    assert distance == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 0.0], [0.0, 1.0], 1.0),  # orthogonal
        ([1.0, 1.0], [2.0, 2.0], 0.0),  # same direction, other length
        ([1.0, 2.0], [-1.0, -2.0], 2.0),  # opposite
        ([1.0, 0.0], [1.0, 1.0], 1.0 - 1.0 / math.sqrt(2.0)),  # 45 degrees
    ],
)
def test_cosine_distance_hand_worked(a: list[float], b: list[float], expected: float) -> None:
    # Prepare: the vector split over two tensors
    ta = {"x": np.array(a[:1]), "y": np.array(a[1:])}
    tb = {"x": np.array(b[:1]), "y": np.array(b[1:])}
    # Execute / Assert
    assert cosine_distance(ta, tb) == pytest.approx(expected, abs=1e-12)


def test_distances_refuse_mismatched_models() -> None:
    # Prepare
    a = {"w": np.zeros(2), "b": np.zeros(1)}
    # Execute / Assert
    with pytest.raises(EvaluationError, match=r"only in the first \['b'\], only in the second"):
        l2_distance(a, {"w": np.zeros(2)})
    with pytest.raises(EvaluationError, match=r"tensor 'w' has shape \(2,\) in the first"):
        l2_distance(a, {"w": np.zeros(3), "b": np.zeros(1)})


def test_cosine_distance_refuses_a_zero_model() -> None:
    with pytest.raises(EvaluationError, match="undefined for a zero model"):
        cosine_distance({"w": np.zeros(2)}, {"w": np.ones(2)})


def test_kl_two_classes_by_hand() -> None:
    # Prepare: P = (1/2, 1/2), Q = (1/4, 3/4)
    p = np.array([0.5, 0.5])
    q = np.array([0.25, 0.75])
    # Execute
    kl = kl_divergence(p, q)
    # Assert: 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert kl.shape == (1,)
    assert kl[0] == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-12)


def test_kl_uses_zero_log_zero_and_clamps_q() -> None:
    # Prepare: p_2 = 0 contributes nothing; q_1 = 0 is clamped to 1e-12
    p = np.array([[1.0, 0.0]])
    q = np.array([[0.0, 1.0]])
    # Execute / Assert: 1 * ln(1 / 1e-12) = 12 ln 10
    assert kl_divergence(p, q)[0] == pytest.approx(12.0 * math.log(10.0), rel=1e-12)


def test_js_identical_disjoint_and_half() -> None:
    # Prepare: rows (identical, disjoint, P=(1,0) against Q=(1/2,1/2))
    p = np.array([[0.3, 0.7], [1.0, 0.0], [1.0, 0.0]])
    q = np.array([[0.3, 0.7], [0.0, 1.0], [0.5, 0.5]])
    # Execute
    js = js_divergence(p, q)
    # Assert: 0; ln 2; with M = (3/4, 1/4): KL(P||M) = ln(4/3),
    # KL(Q||M) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3), JS = (1/2)(3/2) ln(4/3) = 3/4 ln(4/3)
    assert js[0] == pytest.approx(0.0, abs=1e-15)
    assert js[1] == pytest.approx(math.log(2.0), rel=1e-12)
    assert js[2] == pytest.approx(0.75 * math.log(4.0 / 3.0), rel=1e-12)


def test_divergences_refuse_non_distributions() -> None:
    with pytest.raises(EvaluationError, match="a row of P sums to 0.9; expected 1"):
        kl_divergence(np.array([0.5, 0.4]), np.array([0.5, 0.5]))
    with pytest.raises(EvaluationError, match=r"shapes \(1, 2\) and \(1, 3\)"):
        js_divergence(np.array([0.5, 0.5]), np.array([0.2, 0.3, 0.5]))
    with pytest.raises(EvaluationError, match="Q has negative or non-finite entries"):
        js_divergence(np.array([0.5, 0.5]), np.array([1.5, -0.5]))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda v: sum(v) > 1e-3),
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda v: sum(v) > 1e-3),
)
def test_js_is_symmetric_and_within_zero_ln2(a: list[float], b: list[float]) -> None:
    # Prepare
    p = np.array(a) / sum(a)
    q = np.array(b) / sum(b)
    # Execute
    forward = js_divergence(p, q)[0]
    backward = js_divergence(q, p)[0]
    # Assert
    assert 0.0 <= forward <= math.log(2.0)
    assert forward == pytest.approx(backward, abs=1e-12)
    assert kl_divergence(p, q, epsilon=1e-300)[0] >= -1e-12  # Gibbs' inequality


def test_prediction_divergence_of_two_constant_models() -> None:
    # Prepare: P = softmax(0, 0) = (1/2, 1/2), Q = softmax(0, ln 3) = (1/4, 3/4) on every input
    model = nn.Linear(1, 2)
    data = ArrayDataset(x=np.arange(5, dtype=np.float32).reshape(5, 1), y=np.zeros(5, np.int64),
                        num_classes=2, name="five")
    # Execute
    result = prediction_divergence(
        model, constant_tensors([0.0, 0.0]), constant_tensors([0.0, math.log(3.0)]), data
    )
    # Assert: KL = 1/2 ln(4/3); with M = (3/8, 5/8):
    # JS = 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)] + 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)]
    expected_js = 0.25 * math.log(4 / 3) + 0.25 * math.log(4 / 5) + 0.125 * math.log(2 / 3) + (
        0.375 * math.log(6 / 5)
    )
    assert result.kl == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)
    assert result.js == pytest.approx(expected_js, rel=1e-5)
    assert torch.equal(model.bias.detach(), torch.tensor([0.0, math.log(3.0)]))  # last loaded

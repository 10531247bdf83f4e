"""The fitted attacks as plain arrays (fedforget.evaluation.attack_models): the same
membership probabilities as scikit-learn, bit for bit, kept without pickle."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from fedforget.evaluation.attack_models import (
    LogisticScorer,
    TreeEnsembleScorer,
    from_sklearn,
    load_scorer,
    save_scorer,
)
from fedforget.evaluation.errors import EvaluationError


def _features(rng: np.random.Generator, n: int, dtype: type) -> np.ndarray:
    """Sorted softmax-like vectors, as attack_features gives."""
    x = rng.dirichlet(np.full(10, 0.3), size=n)
    return (-np.sort(-x, axis=1)).astype(dtype)


def _fitted(kind: str, dtype: type) -> tuple[object, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = _features(rng, 3000, dtype)
    y = (rng.random(3000) < 0.2 + 0.6 * x[:, 0]).astype(np.int64)
    clf = (LogisticRegression(class_weight="balanced", random_state=3, max_iter=1000)
           if kind == "logistic" else GradientBoostingClassifier(random_state=3))
    clf.fit(x, y)
    return clf, x, _features(rng, 2000, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["logistic", "trees"])
def test_the_arrays_give_scikit_learn_s_probabilities_bit_for_bit(kind: str, dtype: type
                                                                  ) -> None:
    # Prepare
    clf, fitted_on, unseen = _fitted(kind, dtype)
    # Execute
    scorer = from_sklearn(clf, fitted_on)
    # Assert: on data it was not fitted on too, and after a save and a load
    assert isinstance(scorer, LogisticScorer if kind == "logistic" else TreeEnsembleScorer)
    expected = clf.predict_proba(unseen)  # type: ignore[attr-defined]
    assert np.array_equal(scorer.predict_proba(unseen), expected)
    assert np.array_equal(load_scorer(save_scorer(scorer)).predict_proba(unseen), expected)
    assert len(np.unique(expected[:, 1])) > 100  # not a constant: the trees do split


def test_a_tree_whose_root_is_a_leaf_and_a_threshold_tie() -> None:
    # A hand-made ensemble: tree 0 is one leaf (0.5), tree 1 splits feature 1 at 0.25
    # (left 1.0, right -2.0); learning rate 0.1, init -0.3.
    scorer = TreeEnsembleScorer(
        init=-0.3, learning_rate=0.1, offsets=np.array([0, 1]),
        left=np.array([-1, 1, -1, -1]), right=np.array([-1, 2, -1, -1]),
        feature=np.array([-2, 1, -2, -2]), threshold=np.array([-2.0, 0.25, -2.0, -2.0]),
        value=np.array([0.5, 0.0, 1.0, -2.0]))
    # 0.25 + 1e-9 is 0.25 in float32: it goes left, as in scikit-learn, which compares
    # float32 features with the thresholds.
    x = np.array([[0.9, 0.25], [0.9, 0.2500001], [0.0, -5.0], [0.0, 0.25 + 1e-9]])
    raw = np.array([-0.3 + 0.05 + 0.1, -0.3 + 0.05 - 0.2, -0.3 + 0.05 + 0.1,
                    -0.3 + 0.05 + 0.1])
    p = scorer.predict_proba(x)
    assert np.allclose(p[:, 1], 1 / (1 + np.exp(-raw)), rtol=0, atol=1e-15)
    assert np.array_equal(p[:, 0], 1 - p[:, 1])


def test_what_cannot_be_converted_exactly_is_left_to_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    x = _features(rng, 200, np.float64)
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, rng.integers(0, 2, 200))
    three = LogisticRegression(max_iter=500).fit(x, rng.integers(0, 3, 200))
    assert from_sklearn(forest, x) is None
    assert from_sklearn(three, x) is None  # not binary


@pytest.mark.parametrize("data", [b"", b"not an npz", None])
def test_a_damaged_or_foreign_file_is_refused(data: bytes | None) -> None:
    if data is None:  # a valid npz of another format number
        import io

        buffer = io.BytesIO()
        np.savez(buffer, format=np.array([99]), kind=np.array("logistic"))
        data = buffer.getvalue()
    with pytest.raises(EvaluationError, match="not a saved attack classifier"):
        load_scorer(data)

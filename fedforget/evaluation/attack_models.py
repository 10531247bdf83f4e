"""Fitted membership-attack classifiers as plain arrays: applied without scikit-learn and
kept on disk without pickle.

The attacks of :mod:`fedforget.evaluation.membership` are fitted with scikit-learn
(``LogisticRegression`` for the shadow attack, ``GradientBoostingClassifier`` for FedEraser's
attack on the original model). Once fitted, each is converted here into arrays that give
the same membership probabilities, computed as scikit-learn 1.9 computes them:

* logistic regression (binary): ``p = expit(X @ coef_.T + intercept_)``
  (``LinearClassifierMixin.decision_function`` then ``_predict_proba_lr``);
* gradient boosting (binary, one tree per stage): ``X`` cast to float32, the init
  estimator's constant raw prediction, then for each stage in order
  ``raw += learning_rate * value[leaf]`` where the leaf is reached by going left while
  ``X[i, feature] <= threshold`` (``predict_stages``), then ``p = expit(raw)``
  (``HalfBinomialLoss.predict_proba``).

``expit`` is SciPy's, as in scikit-learn. A test fits both kinds on random data and finds
the probabilities equal to scikit-learn's, bit for bit, so converting changes no figure.

Why: importing scikit-learn takes 1.5-2.5 s (SciPy's statistics and pandas come with it)
and fitting FedEraser's attack on 1,000 clients' data about 2 s, in every measurement.
A fitted attack depends only on what it was fitted on, so :mod:`fedforget.measure` keeps
it (:func:`save_scorer`, :func:`load_scorer`: an ``.npz`` of numbers, read with
``allow_pickle=False``) and a later measurement of the same run loads it instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedforget.evaluation.errors import EvaluationError

__all__ = ["LogisticScorer", "TreeEnsembleScorer", "from_sklearn", "load_scorer",
           "save_scorer"]

_FORMAT = 1


def _expit(raw: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(raw)


def _two_columns(p: np.ndarray) -> np.ndarray:
    proba = np.empty((p.shape[0], 2), dtype=p.dtype)
    proba[:, 1] = p
    proba[:, 0] = 1 - p
    return proba


@dataclass(frozen=True, eq=False)
class LogisticScorer:
    """A fitted binary logistic regression: ``coef`` of shape (1, d), ``intercept`` (1,),
    both in the dtype they were fitted in."""

    coef: np.ndarray
    intercept: np.ndarray

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``[1 - p, p]`` per row, ``p`` the membership probability."""
        scores = np.asarray(features) @ self.coef.T + self.intercept
        return _two_columns(_expit(scores.reshape(-1)))

    def arrays(self) -> dict[str, np.ndarray]:  # noqa: D102
        return {"coef": self.coef, "intercept": self.intercept}


@dataclass(frozen=True, eq=False)
class TreeEnsembleScorer:
    """Fitted binary gradient boosting: a constant ``init`` raw prediction, the
    ``learning_rate``, and per tree (stage) its node arrays, concatenated: ``offsets[s]``
    is the first node of tree ``s``; ``left``/``right`` are indices within the tree (-1 at a
    leaf), ``feature``/``threshold`` the split, ``value`` the leaf's output."""

    init: float
    learning_rate: float
    offsets: np.ndarray
    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``[1 - p, p]`` per row, ``p`` the membership probability."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        n, trees = x.shape[0], len(self.offsets)
        tree_of = np.repeat(self.offsets, np.diff(np.append(self.offsets, len(self.left))))
        left = np.where(self.left == -1, -1, self.left + tree_of)  # global node indices
        right = np.where(self.right == -1, -1, self.right + tree_of)
        # Every (example, tree) pair walks down its tree at once, one level a step.
        node = np.broadcast_to(self.offsets, (n, trees)).copy()
        rows = np.broadcast_to(np.arange(n)[:, None], (n, trees))
        inner = left[node] != -1
        while inner.any():
            at = node[inner]
            go_left = x[rows[inner], self.feature[at]] <= self.threshold[at]
            node[inner] = np.where(go_left, left[at], right[at])
            inner = left[node] != -1
        leaf_values = self.value[node]
        raw = np.full(n, self.init, dtype=np.float64)
        for stage in range(trees):  # in stage order, as scikit-learn adds them
            raw += self.learning_rate * leaf_values[:, stage]
        return _two_columns(_expit(raw))

    def arrays(self) -> dict[str, np.ndarray]:  # noqa: D102
        return {"init": np.array([self.init]), "learning_rate": np.array([self.learning_rate]),
                "offsets": self.offsets, "left": self.left, "right": self.right,
                "feature": self.feature, "threshold": self.threshold, "value": self.value}


Scorer = LogisticScorer | TreeEnsembleScorer


def from_sklearn(classifier: Any, reference: np.ndarray) -> Scorer | None:
    """The arrays of a fitted scikit-learn ``LogisticRegression`` or
    ``GradientBoostingClassifier`` (binary, classes 0 and 1), or None where they cannot be
    had exactly: another kind of classifier, or a scikit-learn that computes otherwise.
    ``reference`` (features the classifier was fitted on) checks the conversion: the
    converted scorer must give exactly ``classifier.predict_proba(reference)``."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    if list(getattr(classifier, "classes_", [])) != [0, 1]:
        return None
    scorer: Scorer
    if isinstance(classifier, LogisticRegression):
        # In the dtype scikit-learn fitted them in (float32 for float32 features).
        scorer = LogisticScorer(coef=np.array(classifier.coef_),
                                intercept=np.array(classifier.intercept_))
    elif isinstance(classifier, GradientBoostingClassifier):
        if classifier.estimators_.shape[1] != 1:
            return None
        trees = [stage[0].tree_ for stage in classifier.estimators_]
        sizes = [t.node_count for t in trees]
        try:  # the init estimator's raw prediction (the class prior's log-odds)
            init = classifier._raw_predict_init(np.asarray(reference[:1], dtype=np.float32))
        except AttributeError:  # pragma: no cover - another scikit-learn
            return None
        scorer = TreeEnsembleScorer(
            init=float(init[0, 0]), learning_rate=float(classifier.learning_rate),
            offsets=np.cumsum([0, *sizes[:-1]]).astype(np.int64),
            left=np.concatenate([t.children_left for t in trees]).astype(np.int64),
            right=np.concatenate([t.children_right for t in trees]).astype(np.int64),
            feature=np.concatenate([t.feature for t in trees]).astype(np.int64),
            threshold=np.concatenate([t.threshold for t in trees]).astype(np.float64),
            value=np.concatenate([t.value[:, 0, 0] for t in trees]).astype(np.float64),
        )
    else:
        return None
    if not np.array_equal(scorer.predict_proba(reference), classifier.predict_proba(reference)):
        return None  # pragma: no cover - another scikit-learn computing otherwise
    return scorer


def save_scorer(scorer: Scorer) -> bytes:
    """The ``.npz`` bytes of ``scorer`` (numbers only)."""
    kind = "logistic" if isinstance(scorer, LogisticScorer) else "trees"
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {"format": np.array([_FORMAT]), "kind": np.array(kind),
                              **scorer.arrays()}
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def load_scorer(data: bytes) -> Scorer:
    """The scorer saved by :func:`save_scorer`.

    Raises
    ------
    EvaluationError
        If the bytes are not a saved scorer of this format.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        if int(arrays.pop("format")[0]) != _FORMAT:
            raise ValueError("another format")
        kind = str(arrays.pop("kind"))
        if kind == "logistic":
            return LogisticScorer(coef=arrays["coef"], intercept=arrays["intercept"])
        if kind == "trees":
            return TreeEnsembleScorer(
                init=float(arrays.pop("init")[0]),
                learning_rate=float(arrays.pop("learning_rate")[0]), **arrays)
        raise ValueError(f"unknown kind {kind!r}")
    except (ValueError, KeyError, TypeError, OSError, EOFError) as exc:
        raise EvaluationError(f"not a saved attack classifier: {exc or 'empty'}") from None

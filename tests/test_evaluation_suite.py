"""Tests of fedforget.evaluation.suite: every figure of the protocol on constant models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from torch import nn

from fedforget.data import ArrayDataset
from fedforget.evaluation import EvaluationError, evaluate_unlearning


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
    return evaluate_unlearning(
        model=nn.Linear(1, 2),
        original=ORIGINAL,
        unlearned=UNLEARNED,
        retrained=RETRAINED,
        test_set=labelled([1, 1, 1, 0], "test"),
        forgotten=labelled([1, 1], "forgotten"),
        holdout=labelled([0, 1], "holdout"),
        **extra,  # type: ignore[arg-type]
    )


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
    assert report["client_impact"] is None


def test_client_accuracies_come_in_pairs() -> None:
    with pytest.raises(EvaluationError, match="given only before unlearning; expected both"):
        run(client_accuracy_before={"c1": 0.5})

"""Tests of fedforget.evaluation.impact: per-client accuracy change, worst clients."""

from __future__ import annotations

import json

import pytest

from fedforget.evaluation import EvaluationError, client_impact


def test_client_impact_by_hand() -> None:
    # Prepare
    before = {"a": 0.8, "b": 0.9, "c": 0.7, "d": 0.6}
    after = {"a": 0.7, "b": 0.95, "c": 0.5, "d": 0.6}
    # Execute
    report = client_impact(before, after, worst=2)
    # Assert: changes -0.1, +0.05, -0.2, 0; mean = -0.25 / 4 = -0.0625
    assert report.changes == pytest.approx({"a": -0.1, "b": 0.05, "c": -0.2, "d": 0.0})
    assert [cid for cid, _ in report.worst] == ["c", "a"]
    assert [change for _, change in report.worst] == pytest.approx([-0.2, -0.1])
    assert report.mean == pytest.approx(-0.0625)
    assert report.min == pytest.approx(-0.2)
    assert json.loads(json.dumps(report.to_dict()))["worst"][0]["client"] == "c"


def test_worst_ties_are_broken_by_client_id_and_capped() -> None:
    # Prepare: both lose 0.25 (exact in binary)
    before = {"z": 0.5, "y": 0.75}
    after = {"z": 0.25, "y": 0.5}
    # Execute
    report = client_impact(before, after)  # worst=3 > two clients
    # Assert
    assert report.worst == [("y", -0.25), ("z", -0.25)]


@pytest.mark.parametrize(
    ("before", "after", "worst", "message"),
    [
        ({}, {}, 3, "no clients to report on"),
        ({"a": 0.5}, {"b": 0.5}, 3, r"only before: \['a'\], only after: \['b'\]"),
        ({"a": 1.5}, {"a": 0.5}, 3, "accuracy before of client 'a' is 1.5; expected a number"),
        ({"a": 0.5}, {"a": 0.5}, -1, "worst = -1 is out of range"),
    ],
)
def test_client_impact_refuses_bad_input(
    before: dict[str, float], after: dict[str, float], worst: int, message: str
) -> None:
    with pytest.raises(EvaluationError, match=message):
        client_impact(before, after, worst=worst)

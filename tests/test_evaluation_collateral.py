"""Who else is hurt: the collateral figures on federations where the answer is known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedforget.data import ArrayDataset
from fedforget.evaluation.collateral import (
    ClientProfile,
    collateral_report,
    correlation,
    holm,
    mean_interval,
)
from fedforget.evaluation.errors import EvaluationError
from fedforget.evaluation.profile import make_probe, profile_task
from fedforget.models import LogisticRegression

CENTRES = {0: (5.0, 0.0), 1: (-5.0, 0.0), 2: (0.0, 5.0)}


def _data(labels: list[int], name: str, offset: int) -> ArrayDataset:
    rng = np.random.default_rng(offset)
    x = np.array([CENTRES[c] for c in labels]) + 0.3 * rng.standard_normal((len(labels), 2))
    return ArrayDataset(x=x, y=np.array(labels), num_classes=3, name=name,
                        ids=offset + np.arange(len(labels)))


def _model(forget_class_2: bool) -> torch.nn.Module:
    """Logistic regression whose class scores are the dot product with the class centres:
    it classifies the three clusters. With ``forget_class_2`` class 2's score is -inf-like
    (what a perfect unlearning of the departed client, who held class 2, would leave)."""
    model = LogisticRegression((2,), 3)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([CENTRES[c] for c in range(3)]))
        model.linear.bias.copy_(torch.tensor([0.0, 0.0, -100.0 if forget_class_2 else 0.0]))
    return model


def test_a_clone_of_the_departed_client_is_hurt_most_and_named() -> None:
    # Prepare: the departed client D holds class 2 only; C is its clone (same
    # distribution); A and B hold classes 0 and 1; E holds 6 of class 0 and 4 of class 2.
    departed = _data([2] * 10, "D", 0)
    clients = {
        "A": (_data([0] * 10, "A", 100), _data([0] * 10, "A/h", 200)),
        "B": (_data([1] * 10, "B", 300), _data([1] * 10, "B/h", 400)),
        "C": (_data([2] * 10, "C", 500), _data([2] * 10, "C/h", 600)),
        "E": (_data([0] * 6 + [2] * 4, "E", 700), _data([0] * 6 + [2] * 4, "E/h", 800)),
    }
    test = _data([0, 1, 2] * 10, "test", 900)
    original, unlearned = _model(False), _model(True)
    probe = make_probe(original, departed, test)
    # Execute: every client profiles both models on its own data, as in a deployment.
    profiles = []
    for cid, (train, held) in clients.items():
        before = profile_task(original, train, held, probe.config())
        after = profile_task(unlearned, train, held, {})
        profiles.append(ClientProfile(
            client_id=cid, accuracy_before=before["accuracy"],
            accuracy_after=after["accuracy"], num_examples=int(before["profile-examples"]),
            label_similarity=before["label-similarity"],
            representation_similarity=before["representation-similarity"]))
    report = collateral_report(profiles)
    by_id = {p.client_id: p for p in report.clients}
    # Assert, by hand: harm = share of class 2 in the held-out data (1, 0.4, 0, 0);
    # label similarity 1 - TV to the all-class-2 distribution (C 1, E 0.4, A and B 0).
    assert [by_id[c].harm for c in "ABCE"] == [0.0, 0.0, 1.0, pytest.approx(0.4)]
    assert [by_id[c].label_similarity for c in "ABCE"] == [0.0, 0.0, 1.0,
                                                          pytest.approx(0.4)]
    rep = {c: by_id[c].representation_similarity for c in "ABCE"}
    assert max(rep, key=rep.get) == "C" and rep["C"] > 0.99  # type: ignore[arg-type]
    assert report.hurt == ["C"]  # only the clone's loss is significantly above the rest's
    assert report.label.r == pytest.approx(1.0)
    assert report.representation.r is not None and report.representation.r > 0.9
    assert report.to_dict()["hurt_mean_harm"] == 1.0


def test_correlation_and_its_fisher_interval_by_hand() -> None:
    # x = 1..5, y = (2, 4, 5, 4, 5): deviations (-2,-1,0,1,2) and (-2,0,1,0,1),
    # sum of products 6, sxx 10, syy 6, so r = 6 / sqrt(60).
    c = correlation([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    r = 6 / math.sqrt(60)
    half = 1.959963984540054 / math.sqrt(5 - 3)
    assert c.r == pytest.approx(r)
    assert c.low == pytest.approx(math.tanh(math.atanh(r) - half))
    assert c.high == pytest.approx(math.tanh(math.atanh(r) + half))
    assert correlation([1, 2, 3], [3, 2, 1]).low is None  # no interval below 4 points
    assert correlation([1, 1, 1, 1], [1, 2, 3, 4]).r is None  # no spread


def test_holm_stops_at_the_first_p_value_above_its_threshold() -> None:
    assert holm({"a": 0.01, "b": 0.02, "c": 0.04}) == ["a", "b", "c"]
    assert holm({"a": 0.01, "b": 0.03, "c": 0.04}) == ["a"]  # 0.03 > 0.05 / 2
    assert holm({"a": 0.2}) == []


def test_mean_interval_uses_student_t() -> None:
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    # s = 1, n = 3, t_{2, 0.975} = 4.302652729911275
    assert (mean, low, high) == (2.0, pytest.approx(2 - 4.302652729911275 / math.sqrt(3)),
                                 pytest.approx(2 + 4.302652729911275 / math.sqrt(3)))


def test_group_figures_and_bad_input() -> None:
    profiles = [ClientProfile(f"c{i}", 0.9, 0.9 - 0.1 * (i >= 2), 100, group=int(i >= 2))
                for i in range(4)]
    groups = collateral_report(profiles).groups
    assert groups[0]["mean_harm"] == 0.0
    assert groups[1]["mean_harm"] == pytest.approx(0.1)
    with pytest.raises(EvaluationError, match="accuracy after of client 'x' is 1.5"):
        collateral_report([ClientProfile("x", 0.5, 1.5, 10)])
    with pytest.raises(EvaluationError, match="no remaining client"):
        collateral_report([])


def test_in_a_grouped_run_the_departed_clients_group_mate_is_the_most_similar(
    tmp_path: Path,
) -> None:
    # Prepare: 4 clients in two accent groups (client-002 and client-003 share one).
    from conftest import train_small

    from fedforget.engine import run_unlearning

    run = tmp_path / "run"
    train_small(run, **{"groups": "2,2", "num-rounds": 4, "local-epochs": 2})
    # Execute: client-002 leaves; the exact method is the reference.
    outcome = run_unlearning(run, client="client-002", method="retrain", progress=False)
    assert outcome is not None
    collateral = outcome.metrics["collateral"]
    clients = collateral["clients"]
    # Assert: its group mate is the remaining client most similar to it, and the one whose
    # accent (the group-1 test set) the retrained model knows less.
    assert collateral["forgotten_groups"] == [1]
    assert clients["client-003"]["group"] == 1
    rep = {cid: c["representation_similarity"] for cid, c in clients.items()}
    assert max(rep, key=rep.get) == "client-003"  # type: ignore[arg-type]
    groups = outcome.metrics["group_accuracy"]
    assert groups["1"]["unlearned"] < groups["1"]["original"]
    # the receipt states the correlations (its comparison is signed)
    from fedforget.receipts import load_public_key
    from fedforget.receipts.verify import verify_receipt

    receipt = outcome.receipt
    assert receipt is not None
    verified = verify_receipt((run / receipt.receipt_path).read_bytes(),
                              public_key=load_public_key(receipt.public_key_path))
    metrics = verified.statement.comparison.metrics  # type: ignore[union-attr]
    assert "collateral-representation-correlation-r" in metrics
    assert "collateral-hurt-clients" in metrics


def test_a_client_answers_its_own_probe_as_the_server_would_build_it() -> None:
    from fedforget.evaluation.profile import PROBE_ROLE, probe_from_metrics

    departed = _data([2] * 6 + [0] * 4, "D", 0)
    test = _data([0, 1, 2] * 10, "test", 900)
    model = _model(False)
    built = make_probe(model, departed, test)
    answered = probe_from_metrics(profile_task(model, departed, departed, {PROBE_ROLE: True}),
                                  built.centre)
    assert answered is not None
    assert answered.labels == pytest.approx(built.labels)  # (0.4, 0, 0.6)
    assert answered.labels == pytest.approx((0.4, 0.0, 0.6))
    assert answered.embedding == pytest.approx(built.embedding)

"""The untimed warm-up client step before a method is not counted in the method's cost."""

from __future__ import annotations

from pathlib import Path

from conftest import train_small

from fedforget.engine import run_unlearning


def test_rollback_cost_is_its_replay_only_when_no_reference_is_computed(
        tmp_path: Path) -> None:
    # 4 clients, 3 rounds, every client every round, 1 local epoch: forgetting client-001
    # (first contribution: round 1) replays rounds 1-3 with the 3 others = 9 client-epochs
    # in 3 rounds. (With the reference computed, the counter is reset after it anyway.)
    out = tmp_path / "run"
    train_small(out)
    outcome = run_unlearning(out, client="client-001", method="rollback", progress=False,
                             reference="none")
    assert outcome is not None
    assert outcome.cost.client_epochs == 9 and outcome.cost.rounds == 3

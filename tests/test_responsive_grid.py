"""ResponsiveGrid: replies picked up soon after they arrive, on a fake clock."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

import fedforget.federation as federation
from fedforget.engine.inprocess import InProcessGrid
from fedforget.federation import ResponsiveGrid, responsive


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class SlowGrid:
    """Replies to message i become available at ``ready[i]`` (fake seconds)."""

    def __init__(self, clock: Clock, ready: list[float]) -> None:
        self.clock = clock
        self.ready = ready
        self.pulled_at: list[float] = []

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulled_at.append(self.clock.now)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in ids if self.ready[int(i[1:])] <= self.clock.now]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(federation, "time", SimpleNamespace(monotonic=fake.monotonic,
                                                            sleep=fake.sleep))
    return fake


def test_every_reply_is_collected_soon_after_the_last_arrives(clock: Clock) -> None:
    # Prepare: three replies, the last after 0.3 s
    slow = SlowGrid(clock, [0.01, 0.2, 0.3])
    grid = ResponsiveGrid(slow)  # type: ignore[arg-type]
    # Execute
    replies = list(grid.send_and_receive(["a", "b", "c"], timeout=None))
    # Assert: all three; picked up within a quarter of the wait (0.3 / 4) after arriving,
    # with pauses that only grow (1 ms, x1.25, at most 50 ms)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.3 <= clock.now <= 0.3 + 0.3 / 4
    pauses = [b - a for a, b in zip(slow.pulled_at, slow.pulled_at[1:], strict=False)]
    assert pauses[0] == pytest.approx(0.001)
    assert all(b >= a - 1e-12 for a, b in zip(pauses, pauses[1:], strict=False))
    assert max(pauses) <= 0.05 + 1e-12
    assert len(slow.pulled_at) == grid.pulls < 30


def test_a_long_wait_is_polled_at_most_every_50_ms(clock: Clock) -> None:
    slow = SlowGrid(clock, [10.0])
    grid = ResponsiveGrid(slow)  # type: ignore[arg-type]
    grid.send_and_receive(["a"], timeout=None)
    assert 10.0 <= clock.now <= 10.05
    assert len(slow.pulled_at) <= 10.0 / 0.05 + 30  # 20 pulls/s once at the longest pause


def test_the_timeout_is_kept(clock: Clock) -> None:
    slow = SlowGrid(clock, [0.05, 99.0])
    grid = ResponsiveGrid(slow)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(["a", "b"], timeout=1.0))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock.now == pytest.approx(1.0)


def test_a_synchronous_grid_is_not_wrapped() -> None:
    from fedforget.engine.apps import find_project

    _, client_app = find_project().load()
    grid = InProcessGrid(client_app, num_nodes=1, run_config={})
    assert responsive(grid) is grid
    wrapped = responsive(SlowGrid(Clock(), []))  # type: ignore[arg-type]
    assert isinstance(wrapped, ResponsiveGrid) and responsive(wrapped) is wrapped

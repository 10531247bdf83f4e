"""``flower-supernode`` with a shorter poll: ``python -m fedforget.engine.supernode``.

Usage::

    python -m fedforget.engine.supernode [--poll-interval S] [--max-poll-interval S] \\
        FLOWER-SUPERNODE-FLAGS...

Every other flag goes to ``flower-supernode`` unchanged,
and it is Flower's own SuperNode that runs. One thing differs, and only in this process:
Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed
**3 s** whenever the SuperLink had no message for it and **0.5 s** between checks for the
ClientApp's reply; neither is configurable. A node that has just replied therefore sees
the next round's message up to 3 s late, which alone costs up to 3 s per round. Here the
idle wait starts at ``--poll-interval`` (default 0.02 s) and grows by half per empty pull up
to ``--max-poll-interval`` (default 0.25 s), back to the start once a message was handled; the
reply wait is capped at ``--poll-interval``. This is done by replacing the ``time`` module
that this one Flower module sees with a proxy whose ``sleep`` does that; everything else is
the real ``time``. Likewise the retry of a message's objects that are not at the SuperLink
yet (a node that polls fast may see a message before all its objects are pushed) starts at
``--poll-interval`` instead of Flower's 1 s (then 2 s, 4 s, ...) and is capped at
:data:`PULL_BACKOFF_CAP` (0.05 s; or ``--max-poll-interval`` if shorter): the objects of a
message come right after it, and the whole round waits on them. The price: an idle node
asks the SuperLink up to four times a second (``--max-poll-interval 0.25``) instead of
every 3 s. The stock ``flower-supernode`` works with fedforget unchanged,
only slower.

This patches a private detail of Flower (pinned ``<2``): if a Flower release stops using
the ``time`` module there, :func:`patch_poll_interval` raises instead of silently running
the slow loop.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import sys
import time
from types import ModuleType
from typing import Any

from fedforget.errors import ConfigError

DEFAULT_POLL_INTERVAL = 0.02
DEFAULT_MAX_POLL_INTERVAL = 0.25
_MODULE = "flwr.supernode.start_client_internal"
PULL_BACKOFF_CAP = 0.05
"""Seconds, at most, between two asks for a message's objects not at the SuperLink yet."""


IDLE_WAIT = 3.0
"""Flower's wait after an empty pull (``time.sleep(3)`` in its SuperNode loop)."""
BUSY_GAP = 0.25
"""Seconds between two idle waits beyond which the node is taken to have handled a message."""


class _ShortPoll:
    """The ``time`` module, with the SuperNode loop's waits shortened.

    Flower's idle wait (3 s) becomes ``initial``, growing by ``growth`` per idle wait up to
    ``maximum``, and back to ``initial`` once the node handled a message (a wait for the
    ClientApp's reply, or a gap of more than :data:`BUSY_GAP` between two idle waits).
    Shorter waits (0.5 s for the reply) are capped at ``initial``.
    """

    def __init__(self, initial: float, maximum: float, growth: float = 1.5) -> None:
        self.initial = initial
        self.maximum = maximum
        self.growth = growth
        self._next = initial
        self._last_idle_end: float | None = None

    def sleep(self, seconds: float) -> None:
        if seconds < IDLE_WAIT:  # waiting for the ClientApp's reply: a message came in
            self._next = self.initial
            time.sleep(min(seconds, self.initial))
            return
        now = time.monotonic()
        if self._last_idle_end is not None and now - self._last_idle_end > BUSY_GAP:
            self._next = self.initial
        time.sleep(min(seconds, self._next))
        self._next = min(self.maximum, self._next * self.growth)
        self._last_idle_end = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_poll_interval(initial: float, maximum: float | None = None) -> ModuleType:
    """Shorten the waits of Flower's SuperNode loop (in this process; see :class:`_ShortPoll`)."""
    maximum = initial if maximum is None else maximum
    if not 0 < initial <= maximum <= IDLE_WAIT:
        raise ConfigError(f"poll interval = {initial!r} s, max = {maximum!r} s: expected "
                          f"0 < interval <= max <= {IDLE_WAIT:g}")
    module = importlib.import_module(_MODULE)
    current = getattr(module, "time", None)
    if current is not time and not isinstance(current, _ShortPoll):
        raise ConfigError(
            f"{_MODULE} no longer uses the time module: this Flower version's SuperNode "
            "loop cannot be given a shorter poll; run flower-supernode itself"
        )
    module.time = _ShortPoll(initial, maximum)  # type: ignore[attr-defined]
    pull = getattr(module, "pull_objects", None)
    if pull is None or "initial_backoff" not in inspect.signature(pull).parameters:
        raise ConfigError(f"{_MODULE}.pull_objects is not Flower 1.42's (no initial_backoff): "
                          "this SuperNode loop cannot be given a shorter poll")
    if not isinstance(pull, functools.partial):
        module.pull_objects = functools.partial(  # type: ignore[attr-defined]
            pull, initial_backoff=initial, backoff_cap=min(maximum, PULL_BACKOFF_CAP))
    return module


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperNode with the given flags and a capped poll interval."""
    parser = argparse.ArgumentParser(
        prog="python -m fedforget.engine.supernode", add_help=False, allow_abbrev=False,
        description="flower-supernode with a shorter poll interval",
    )
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    parser.add_argument("--max-poll-interval", type=float, default=DEFAULT_MAX_POLL_INTERVAL)
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    patch_poll_interval(ours.poll_interval, ours.max_poll_interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()

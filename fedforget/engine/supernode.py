"""``flower-supernode`` with a shorter poll: ``python -m fedforget.engine.supernode``.

Usage::

    python -m fedforget.engine.supernode [--poll-interval SECONDS] FLOWER-SUPERNODE-FLAGS...

Every flag after the optional ``--poll-interval`` goes to ``flower-supernode`` unchanged,
and it is Flower's own SuperNode that runs. One thing differs, and only in this process:
Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed
**3 s** whenever the SuperLink had no message for it and **0.5 s** between checks for the
ClientApp's reply; neither is configurable. A node that has just replied therefore sees
the next round's message up to 3 s late, which alone costs up to 3 s per round. Here those
sleeps are capped at ``--poll-interval`` (default 0.05 s) by replacing the ``time`` module
that this one Flower module sees with a proxy whose ``sleep`` is capped; everything else is
the real ``time``. The price: an idle node asks the SuperLink every ``--poll-interval``
instead of every 3 s. The stock ``flower-supernode`` works with fedforget unchanged, only
slower.

This patches a private detail of Flower (pinned ``<2``): if a Flower release stops using
the ``time`` module there, :func:`patch_poll_interval` raises instead of silently running
the slow loop.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from types import ModuleType
from typing import Any

from fedforget.errors import ConfigError

DEFAULT_POLL_INTERVAL = 0.05
_MODULE = "flwr.supernode.start_client_internal"


class _CappedSleep:
    """The ``time`` module, but ``sleep(s)`` sleeps ``min(s, cap)``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_poll_interval(cap: float) -> ModuleType:
    """Cap the sleeps of Flower's SuperNode loop at ``cap`` seconds (in this process)."""
    if not 0 < cap <= 3:
        raise ConfigError(f"poll interval = {cap!r} s: expected more than 0 and at most 3")
    module = importlib.import_module(_MODULE)
    current = getattr(module, "time", None)
    if current is not time and not isinstance(current, _CappedSleep):
        raise ConfigError(
            f"{_MODULE} no longer uses the time module: this Flower version's SuperNode "
            "loop cannot be given a shorter poll; run flower-supernode itself"
        )
    module.time = _CappedSleep(cap)  # type: ignore[attr-defined]
    return module


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperNode with the given flags and a capped poll interval."""
    parser = argparse.ArgumentParser(
        prog="python -m fedforget.engine.supernode", add_help=False, allow_abbrev=False,
        description="flower-supernode with a shorter poll interval",
    )
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    patch_poll_interval(ours.poll_interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()

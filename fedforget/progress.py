"""A small progress display for long work (rounds, cells, phases), written to stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class RoundProgress:
    """One status line per step: ``[round 7/30] acc 0.842 loss 0.51 | 0.21 s/round, eta 5 s``.

    On a terminal the line is redrawn in place; otherwise (logs, CI, ``flwr run`` streams)
    one line is printed every ``every`` steps and at the end.
    """

    def __init__(
        self,
        *,
        total: int,
        start: int = 0,
        label: str = "round",
        enabled: bool = True,
        stream: TextIO | None = None,
        every: int = 5,
    ) -> None:
        self.total = total
        self.start = start
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, every)
        self._t0 = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = ""

    def update(self, step: int, **metrics: float) -> None:
        """Report that ``step`` (1-based, absolute) is done."""
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self._t0
        rate = elapsed / done if done > 0 else 0.0
        eta = rate * (self.total - step)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        line = (
            f"[{self.label} {step}/{self.total}] {shown} | {rate:.2f} s/{self.label}, "
            f"eta {eta:.0f} s"
        )
        self._last_line = line
        if self._tty:
            self.stream.write("\r" + line.ljust(79))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or done == 1:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the display (a newline after an in-place line)."""
        if self.enabled and self._tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def phase(label: str, *, enabled: bool = True, stream: TextIO | None = None) -> Iterator[None]:
    """Announce one long phase of work on stderr: ``[label] ...`` when it starts and
    ``[label] done in 3.2 s`` (or ``failed after ...``) when it ends."""
    if not enabled:
        yield
        return
    out = stream if stream is not None else sys.stderr
    out.write(f"[{label}] ...\n")
    out.flush()
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        outcome = "done in" if ok else "failed after"
        out.write(f"[{label}] {outcome} {time.perf_counter() - start:.1f} s\n")
        out.flush()

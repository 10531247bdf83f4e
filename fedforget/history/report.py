"""The outcome of verifying a history store: :class:`VerifyReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedforget.errors import IntegrityError

__all__ = ["VerifyReport"]


@dataclass(slots=True)
class VerifyReport:
    """Outcome of :func:`verify_store`.

    Attributes
    ----------
    directory
        The run directory checked.
    problems
        One line per problem, naming the round, the client (if any) and the file.
    notes
        What was not checked and why (no signed heads, no public key...), one line each.
    rounds_checked
        Number of round records examined.
    blobs_checked
        Number of distinct blob files hashed.
    heads_checked
        Signed tree heads whose signature verified and that were compared with the store.
    receipts_checked
        Receipts whose signature verified and that were compared with the store.
    results_checked
        Result directories (and cached references) checked.
    """

    directory: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rounds_checked: int = 0
    blobs_checked: int = 0
    heads_checked: int = 0
    receipts_checked: int = 0
    results_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_for_problems(self) -> None:
        """Fail closed: raise :class:`IntegrityError` listing the problems, if any."""
        if self.problems:
            listed = "\n  ".join(self.problems)
            raise IntegrityError(
                f"history store {self.directory} failed verification with "
                f"{len(self.problems)} problem(s):\n  {listed}"
            )

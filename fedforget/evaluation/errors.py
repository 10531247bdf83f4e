"""The error the evaluation metrics raise on input they cannot measure."""

from __future__ import annotations

from fedforget.errors import FedForgetError


class EvaluationError(FedForgetError, ValueError):
    """A metric was asked of inputs it is not defined on (the message says which and why)."""

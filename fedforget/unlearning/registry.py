"""The registry of unlearning methods (one module per method, one line here per module)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedforget.registry import Registry

if TYPE_CHECKING:
    from fedforget.unlearning.base import Unlearner

METHOD_MODULES = (
    "retrain", "rollback", "federaser", "subtract", "fedrecovery", "fedrecover", "pga"
)
"""The shipped method modules of :mod:`fedforget.unlearning`; each registers itself."""

METHODS: Registry[type[Unlearner[Any]]] = Registry(
    "unlearning method", builtins=tuple(f"fedforget.unlearning.{m}" for m in METHOD_MODULES)
)

"""One registry shape for everything that plugs in: methods, data sets, models, metrics and
client-side procedures.

Each area has one :class:`Registry` (``METHODS`` in :mod:`fedforget.unlearning.base`,
``DATASETS`` in :mod:`fedforget.data.datasets`, ``MODELS`` in :mod:`fedforget.models`,
``METRICS`` in :mod:`fedforget.experiments.metrics`, ``CLIENT_TASKS`` in
:mod:`fedforget.unlearning.client_tasks`). A plug-in is one function or class and one
``register`` line:

.. code-block:: python

    from fedforget.data import DATASETS

    @DATASETS.register("blobs")
    def load_blobs(*, seed, data_path, test_fraction): ...

An area's built-in entries live in modules named by the registry (``builtins``), imported
the first time the registry is read; a module that fails to import is an error, never a
silent skip, and so is an unknown name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

from fedforget.errors import ConfigError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Named entries of one kind.

    Parameters
    ----------
    kind : str
        What an entry is, for messages ("unlearning method", "data set", ...).
    builtins : sequence of str
        Modules that register the shipped entries; imported on first use.
    """

    def __init__(self, kind: str, *, builtins: Sequence[str] = ()) -> None:
        self.kind = kind
        self._builtins = tuple(builtins)
        self._entries: dict[str, T] = {}
        self._loaded = not self._builtins

    # ------------------------------------------------------------------ writing
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: Any = None) -> Any:
        """Add ``entry`` under ``name`` (or, with one argument, a decorator that does).

        Registering another entry under a taken name is an error; the same definition
        registered again (its module imported a second time) replaces the first.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name; got {name!r}")

        def add(obj: T) -> T:
            old = self._entries.get(name)
            same = _definition(old) is not None and _definition(old) == _definition(obj)
            if old is not None and old is not obj and not same:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        if entry is None:
            return add
        return add(entry)

    def remove(self, name: str) -> None:
        """Drop ``name`` if it is registered (a plug-in's teardown, a test's clean-up)."""
        self._entries.pop(name, None)

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: a builtin module may read the registry itself
        for module in self._builtins:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                self._loaded = False
                raise ConfigError(
                    f"the built-in {self.kind} module {module!r} cannot be imported: {exc}"
                ) from exc

    def get(self, name: str) -> T:
        """The entry ``name``; a :class:`~fedforget.errors.ConfigError` naming the known
        ones if there is none."""
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(repr(n) for n in sorted(self._entries)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; expected one of {known}") from None

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted."""
        self._load()
        return tuple(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names())})"


def _definition(obj: object) -> tuple[str, str] | None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None or qualname is None:
        return None
    return module, qualname

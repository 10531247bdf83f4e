"""A least-recently-used cache whose size follows the federation it serves.

``functools.lru_cache`` has one size for every use: too small for a federation of 1,000
clients (every client's data re-derived each round), too large to keep a grid of
experiments from accumulating what earlier runs used. :class:`FederationCache` takes its
capacity with every look-up (e.g. twice the number of clients of the run being served), so
that it holds the current federations and forgets older ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

__all__ = ["FederationCache"]


class FederationCache(Generic[V]):
    """A thread-safe LRU cache of computed values with a capacity given per look-up.

    Parameters
    ----------
    minimum : int
        The smallest capacity, whatever a look-up asks for.
    """

    def __init__(self, minimum: int = 16) -> None:
        self._minimum = minimum
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], V], *, capacity: int) -> V:
        """The value of ``key``, computed by ``compute()`` on a miss; then the least
        recently used entries beyond ``max(capacity, minimum)`` are dropped."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                self.hits += 1
                return self._values[key]
        value = compute()  # outside the lock: computing may take long (or use the cache)
        with self._lock:
            self.misses += 1
            self._values[key] = value
            self._values.move_to_end(key)
            limit = max(capacity, self._minimum)
            while len(self._values) > limit:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Forget every value."""
        with self._lock:
            self._values.clear()

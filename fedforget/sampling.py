"""Client sampling by stable client id with a seeded generator.

Flower's own sampling draws from the global :mod:`random` module over random node ids, so
it cannot be reproduced. Here the selection of round ``t`` depends only on
``(seed, t, eligible client ids)``: the same run samples the same clients on every engine,
and a resumed run samples what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from fedforget.errors import ConfigError


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from its parts (stable across processes and platforms)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


class ClientSampler:
    """Select ``count`` clients per round, uniformly without replacement.

    Parameters
    ----------
    seed : int
        The run seed.
    count : int
        Clients per round; when more are asked than are eligible, all eligible are taken.
    """

    def __init__(self, *, seed: int, count: int) -> None:
        if count < 1:
            raise ConfigError(f"clients per round = {count}: expected >= 1")
        self.seed = seed
        self.count = count

    def sample(
        self, server_round: int, roster: Iterable[str], *, exclude: Iterable[str] = ()
    ) -> list[str]:
        """The sorted client ids selected for ``server_round``.

        The draw is made over the whole ``roster`` and the ``exclude``d clients (withdrawn
        ones) are removed afterwards, so that a run without some clients follows the same
        schedule minus those clients: the definition of retraining without them.
        """
        pool = sorted(set(roster))
        if len(pool) <= self.count:
            chosen_ids = pool
        else:
            rng = np.random.default_rng(derive_seed(self.seed, "sample", server_round))
            chosen = rng.choice(len(pool), size=self.count, replace=False)
            chosen_ids = [pool[int(i)] for i in chosen]
        excluded = set(exclude)
        return sorted(c for c in chosen_ids if c not in excluded)


def client_train_seed(run_seed: int, server_round: int, client_id: str) -> int:
    """The seed a client trains with in a round (its data order)."""
    return derive_seed(run_seed, "train", server_round, client_id)


def model_init_seed(run_seed: int) -> int:
    """The seed of the initial global model."""
    return derive_seed(run_seed, "init")

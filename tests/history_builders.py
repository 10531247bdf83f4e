"""Small hand-made histories for the unlearning method tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedforget.history import HistoryStore, ParticipantUpdate

Tensors = dict[str, np.ndarray]
Round = dict[str, tuple[int, dict[str, Any]]]  # client id -> (n_k, update)


def tensors(w: list[float], b: list[list[float]]) -> Tensors:
    """A two-tensor model: ``w`` (a vector) and ``b`` (a matrix), float32."""
    return {"w": np.array(w, dtype=np.float32), "b": np.array(b, dtype=np.float32)}


def build_store(
    path: Path,
    theta0: Tensors,
    rounds: Sequence[Round],
    *,
    retain_interval: int = 1,
    local_epochs: int = 2,
    recording: dict[str, object] | None = None,
    roster: Sequence[str] | None = None,
) -> HistoryStore:
    """A history whose global models are the FedAvg sums of the given updates (with the
    recording settings ``recording``, frozen at round 1, if given)."""
    store = HistoryStore.create(
        path,
        run_config={"local-epochs": local_epochs, "learning-rate": 0.1, "batch-size": 8,
                    "seed": 0},
        retain_interval=retain_interval,
        fsync=False,
    )
    if recording is not None:
        store.set_recording(recording)
    if roster is not None:
        store.set_roster(list(roster))
    digest = store.put_initial_model(theta0)
    theta = {k: v.astype(np.float64) for k, v in theta0.items()}
    for t, parts in enumerate(rounds, start=1):
        total = sum(n for n, _ in parts.values())
        participants = []
        for cid, (n, upd) in sorted(parts.items()):
            update = {k: np.asarray(v, dtype=np.float32) for k, v in upd.items()}
            participants.append(
                ParticipantUpdate(client_id=cid, num_examples=n, weight=n / total, seed=t,
                                  update=update)
            )
            for k in theta:
                theta[k] += n / total * update[k]
        after = {k: v.astype(np.float32) for k, v in theta.items()}
        record = store.commit_round(round=t, global_before=digest, global_after=after,
                                    participants=participants, config={})
        digest = record.global_after
    return store

"""Rollback-replay: exact unlearning at a fraction of retraining's cost.

Let :math:`t_0` be the first round in which any forgotten client took part. Rounds before
:math:`t_0` never saw those clients, so retraining would reproduce them exactly. Restore

.. math:: \\theta^{R}_{t_0 - 1} = \\theta_{t_0 - 1}

(stored losslessly every round) and replay rounds :math:`t_0..T` without the forgotten
clients, with the same schedule and seeds, through the same engine and ClientApp as
training. Under deterministic seeding the result equals :mod:`retrain
<fedforget.unlearning.retrain>` bit for bit, at a client cost of about
:math:`(T - t_0 + 1)/T` of retraining's.

The history of rounds :math:`1..t_0-1` is forked (hard-linked) and the replayed rounds are
appended to it in ``<workdir>/history``; the original history is left as it was.

Records and classes (:mod:`fedforget.erasure`): :math:`t_0` is also no later than the
first round in which a client whose records are forgotten took part (it trained on them
from its first round: the data pipeline's records are there from the start), and is round
1 when a class is forgotten (any client may hold it; the server does not know which). The
replay leaves out the records and labels in force, so it stays exact.
"""

from __future__ import annotations

from pathlib import Path

from fedforget.unlearning.base import (
    MethodParams,
    Unlearner,
    UnlearningRequest,
    UnlearningResult,
    first_contribution,
    register,
)


@register
class Rollback(Unlearner[MethodParams]):
    """Restore the last global model before the first contribution and replay."""

    name = "rollback"
    exact = True
    request_kinds = ("client", "records", "class")
    Params = MethodParams

    def run(self, request: UnlearningRequest) -> UnlearningResult:  # noqa: D102
        store = request.store
        last = store.last_round
        t0 = first_round(request)
        if t0 is None:
            return UnlearningResult(
                model=store.global_model(last),
                cost=request.federation.cost,
                rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to replay"],
            )
        fork = store.fork(Path(request.workdir) / "history", upto_round=t0 - 1)
        try:
            model = request.federation.replay(
                store=fork, start_round=t0, end_round=last, exclude=request.forget,
                progress_label="rollback round",
            )
            history = str(fork.directory)
        finally:
            fork.close()
        return UnlearningResult(
            model=model,
            cost=request.federation.cost,
            rounds_affected=list(range(t0, last + 1)),
            notes=[f"restored the global model after round {t0 - 1}; replayed {t0}..{last}"],
            history_dir=history,
        )


def first_round(request: UnlearningRequest) -> int | None:
    """:math:`t_0`: the first round that saw anything ``request`` forgets (None: none did)."""
    store = request.store
    if request.scope.labels and store.last_round >= 1:
        return 1
    return first_contribution(store, request.forget | request.scope.record_clients())

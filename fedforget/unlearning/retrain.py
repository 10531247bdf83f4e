"""Retrain: the exact reference.

Train again from the initial model :math:`\\theta_0` with the same schedule and seeds,
without the forgotten clients :math:`F`: in every round t the clients sampled are those
the original run sampled, minus :math:`F` (the sampler draws over the whole roster and
drops the excluded ids afterwards), each training with the same seed.

.. math:: \\theta^{R}_{t} = \\mathrm{FedAvg}\\big(\\{\\theta^{R}_{t-1}
          + \\Delta_{t,k}(\\theta^{R}_{t-1}) : k \\in S_t \\setminus F\\}\\big),
          \\quad t = 1..T

The replayed history is written to ``<workdir>/history`` (a full history of the retrained
model, which later withdrawals can build on).

Records and classes (:mod:`fedforget.erasure`): every client leaves out the records and
labels in force in every replayed round, so the replay is the run as if they had never
existed — exact at every size of request.
"""

from __future__ import annotations

from pathlib import Path

from fedforget.unlearning.base import (
    MethodParams,
    Unlearner,
    UnlearningRequest,
    UnlearningResult,
    register,
)


@register
class Retrain(Unlearner[MethodParams]):
    """Retrain from scratch without the forgotten clients (exact; the reference)."""

    name = "retrain"
    exact = True
    request_kinds = ("client", "records", "class")
    Params = MethodParams

    def run(self, request: UnlearningRequest) -> UnlearningResult:  # noqa: D102
        store = request.store
        last = store.last_round
        fork = store.fork(Path(request.workdir) / "history", upto_round=0)
        try:
            model = request.federation.replay(
                store=fork, start_round=1, end_round=last, exclude=request.forget,
                progress_label="retrain round",
            )
            history = str(fork.directory)
        finally:
            fork.close()
        return UnlearningResult(
            model=model,
            cost=request.federation.cost,
            rounds_affected=list(range(1, last + 1)),
            history_dir=history,
        )

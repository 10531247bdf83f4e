r"""The cost side of the comparison with retraining: speed-ups.

The model-comparison figures (accuracies, membership inference, distances, divergences,
per-client impact) are computed in one place, :func:`fedforget.evaluation.evaluate_unlearning`;
this module only has what needs the costs:

* ``speedup_wall``: :math:`s_{wall} = \mathrm{wall}_{retrain} / \mathrm{wall}_{method}`,
  the server's wall time of each;
* ``speedup_client_epochs``: :math:`s_{ep} = E_{retrain} / E_{method}`, local epochs asked
  of clients.

A method that cost nothing of a kind has no finite speed-up there: ``None``.
"""

from __future__ import annotations

from fedforget.unlearning.base import Cost


def speedup(reference: float, value: float) -> float | None:
    """``reference / value``, or None when ``value <= 0`` (no finite speed-up)."""
    if value <= 0:
        return None
    return reference / value


def speedups(method_cost: Cost, retrain_cost: Cost) -> dict[str, float | None]:
    """Retraining's cost over the method's: ``speedup_wall`` and ``speedup_client_epochs``."""
    return {
        "speedup_wall": speedup(retrain_cost.server_seconds, method_cost.server_seconds),
        "speedup_client_epochs": speedup(retrain_cost.client_epochs, method_cost.client_epochs),
    }

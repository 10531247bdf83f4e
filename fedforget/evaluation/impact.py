r"""The effect of unlearning on each remaining client.

Removing a client can hurt the clients whose data resemble its data. For every remaining
client :math:`k`, measured on its own held-out data,

.. math::

    \Delta_k = \mathrm{acc}_k^{after} - \mathrm{acc}_k^{before},

so a negative :math:`\Delta_k` is accuracy lost to unlearning. The report gives every
:math:`\Delta_k`, their mean and minimum, and the clients hurt most by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedforget.evaluation.errors import EvaluationError


@dataclass(frozen=True)
class ImpactReport:
    """Per-client accuracy changes caused by unlearning.

    Attributes
    ----------
    changes : dict[str, float]
        :math:`\\Delta_k` of every client, in the order of ``before``.
    worst : list[tuple[str, float]]
        The clients with the lowest :math:`\\Delta_k`, lowest first (ties by client id).
    mean : float
        :math:`\\frac{1}{K} \\sum_k \\Delta_k`.
    min : float
        :math:`\\min_k \\Delta_k`.
    """

    changes: dict[str, float]
    worst: list[tuple[str, float]]
    mean: float
    min: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (``worst`` as a list of ``{"client", "change"}`` objects)."""
        return {
            "changes": dict(self.changes),
            "worst": [{"client": cid, "change": change} for cid, change in self.worst],
            "mean": self.mean,
            "min": self.min,
        }


def client_impact(
    before: Mapping[str, float], after: Mapping[str, float], *, worst: int = 3
) -> ImpactReport:
    """Accuracy change of each remaining client, and the ``worst`` clients hurt most.

    Parameters
    ----------
    before, after : Mapping[str, float]
        Client id to accuracy on its held-out data, before (the original model) and after
        (the unlearned model) unlearning; the same clients in both, accuracies in [0, 1].
    worst : int
        How many of the most hurt clients to name, ``>= 0`` (all of them if fewer).

    Raises
    ------
    EvaluationError
        No clients, different clients in the two mappings, an accuracy outside [0, 1], or
        a negative ``worst``.
    """
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise EvaluationError(f"worst = {worst!r} is out of range; expected an integer >= 0")
    if not before:
        raise EvaluationError("no clients to report on; expected at least one accuracy")
    if set(before) != set(after):
        raise EvaluationError(
            f"clients only before: {sorted(set(before) - set(after))}, only after: "
            f"{sorted(set(after) - set(before))}; expected the same clients in both"
        )
    for label, accuracies in (("before", before), ("after", after)):
        for cid, acc in accuracies.items():
            if not (isinstance(acc, int | float) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
                raise EvaluationError(
                    f"accuracy {label} of client {cid!r} is {acc!r}; expected a number in [0, 1]"
                )
    changes = {cid: float(after[cid]) - float(before[cid]) for cid in before}
    ranked = sorted(changes.items(), key=lambda item: (item[1], item[0]))
    values = list(changes.values())
    return ImpactReport(
        changes=changes,
        worst=ranked[:worst],
        mean=math.fsum(values) / len(values),
        min=min(values),
    )

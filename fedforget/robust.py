"""What one client's reply may do to a round: pure, per-reply screening policies.

A recording strategy calls :func:`screen_reply` for every train reply, with the global model
it sent, the local model it got back, the example count the client reported and the data
size recorded for that client. The verdict says whether the reply is accepted, the local
model and example count to aggregate (clipped or capped as configured), and the reasons to
log and to record in the round (a refused reply's reason goes into the round record's
``refused``; the figures of an accepted one, :attr:`ScreenedReply.metrics`, into its
participant metrics).

**Update-norm bound** (:class:`NormBound`). With :math:`\\Delta = \\theta_k - \\theta` over
every floating tensor and :math:`C` the bound,

.. math::

    \\|\\Delta\\|_2 \\le C:\\ \\text{accept};\\qquad
    \\|\\Delta\\|_2 > C:\\ \\begin{cases}
        \\text{refuse} & \\text{policy } \\texttt{refuse}\\\\
        \\theta_k \\leftarrow \\theta + \\Delta \\cdot C / \\|\\Delta\\|_2 &
            \\text{policy } \\texttt{clip}
    \\end{cases}

as the clipping of DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018, https://arxiv.org/abs/1710.06963) and Flower's
``DifferentialPrivacyServerSideFixedClipping``, without the noise. The norm is computed in
float64 and scaled by the largest magnitude, so that an update of values near the float32
maximum (3e38) has a finite norm instead of an overflow; NaN or infinite values are refused
whatever the policy.

**Example-count cap** (:class:`ExampleCap`). FedAvg weights a reply by its reported
:math:`n_k`; a client that reports :math:`10^9` takes all the weight. With :math:`m_k` the
data size recorded for the client and :math:`f` the allowed factor,

.. math:: n_k \\le f\\,m_k:\\ \\text{accept};\\qquad
          n_k > f\\,m_k:\\ \\text{refuse, or } n_k \\leftarrow \\lfloor f\\,m_k \\rfloor

A count that is not a positive integer, or not finite (``1e300`` is finite but is refused by
the same comparison, never converted to a float product that overflows), is refused.

Clipping in the reply's dtype: :math:`\\theta + \\Delta \\cdot s` is rounded to float32,
so the scale :math:`s` is shrunk (a few deterministic steps) until the *stored* update
:math:`\\theta_k' - \\theta` is within :math:`C`, both exactly (in float64) and as the history
records it (the float32 difference, rounded again); the clipped norm never exceeds the bound.

Deviation from a fixed rule: the policies are deterministic functions of the reply alone
(no statistics across the round), so a replay of the same rounds screens the same replies
the same way, and rollback stays bit-identical to retraining under them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Literal

import numpy as np

from fedforget.errors import ConfigError

__all__ = [
    "ExampleCap",
    "NormBound",
    "RobustPolicy",
    "ScreenedReply",
    "cap_examples",
    "screen_reply",
    "update_norm",
]

TensorDict = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class NormBound:
    """Bound :math:`C` on the L2 norm of an update, and what to do beyond it.

    Attributes
    ----------
    max_norm
        :math:`C > 0`, finite.
    policy
        ``"refuse"`` (drop the reply) or ``"clip"`` (scale the update down to norm C).
    """

    max_norm: float
    policy: Literal["refuse", "clip"] = "refuse"

    def __post_init__(self) -> None:
        if (isinstance(self.max_norm, bool) or not isinstance(self.max_norm, int | float)
                or not math.isfinite(self.max_norm) or self.max_norm <= 0):
            raise ConfigError(
                f"max-update-norm = {self.max_norm!r}: expected a finite number > 0"
            )
        if self.policy not in ("refuse", "clip"):
            raise ConfigError(
                f"update-norm-policy = {self.policy!r}: expected 'refuse' or 'clip'"
            )


@dataclass(frozen=True, slots=True)
class ExampleCap:
    """Cap on a reported example count relative to the client's recorded data size.

    Attributes
    ----------
    factor
        :math:`f \\ge 1`: a client may report up to ``factor`` times its recorded size
        (1.0: exactly what it holds; more allows e.g. augmentation).
    policy
        ``"refuse"`` (drop the reply) or ``"cap"`` (weight it as ``floor(f * size)``).
    """

    factor: float = 1.0
    policy: Literal["refuse", "cap"] = "refuse"

    def __post_init__(self) -> None:
        if (isinstance(self.factor, bool) or not isinstance(self.factor, int | float)
                or not math.isfinite(self.factor) or self.factor < 1):
            raise ConfigError(f"max-examples-factor = {self.factor!r}: expected a number >= 1")
        if self.policy not in ("refuse", "cap"):
            raise ConfigError(f"num-examples-policy = {self.policy!r}: expected 'refuse' or 'cap'")


@dataclass(frozen=True, slots=True)
class RobustPolicy:
    """The screening applied to every train reply (None: that check is off)."""

    norm: NormBound | None = None
    examples: ExampleCap | None = None


@dataclass(frozen=True, slots=True)
class ScreenedReply:
    """The verdict on one reply.

    Attributes
    ----------
    accepted
        False: leave the reply out of the round, recording ``reason``.
    local_model
        What to aggregate (the reply's model, or its clipped version); None if refused.
    num_examples
        The weight to aggregate with (reported, or capped); None if refused.
    reason
        Why it was refused, or what was changed ("" when accepted unchanged): one line for
        the log and the round record.
    metrics
        Figures to record with an accepted reply's participant metrics:
        ``fedforget-update-norm`` (the norm before any clipping), and when changed
        ``fedforget-clip-scale`` or ``fedforget-reported-examples``.
    """

    accepted: bool
    local_model: dict[str, np.ndarray] | None
    num_examples: int | None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def update_norm(global_model: TensorDict, local_model: TensorDict, *,
                as_recorded: bool = False) -> float:
    """:math:`\\|\\theta_k - \\theta\\|_2` over the floating tensors, in float64, scaled by
    the largest magnitude (finite for every finite input; ``inf`` or ``nan`` when an input is
    not finite). With ``as_recorded``, of the update as the history records it: the
    difference taken in the tensors' own dtype (a float32 difference rounds), as
    ``HistoryRecording`` does, then measured in float64.

    Raises
    ------
    ConfigError
        If the two models do not have the same keys and shapes.
    """
    if set(global_model) != set(local_model):
        raise ConfigError(
            f"the local model has tensors {sorted(local_model)}; the global model "
            f"{sorted(global_model)}"
        )
    deltas: list[np.ndarray] = []
    for key in sorted(global_model):
        g = np.asarray(global_model[key])
        k = np.asarray(local_model[key])
        if g.shape != k.shape:
            raise ConfigError(f"tensor {key!r} has shape {k.shape}; expected {g.shape}")
        if g.dtype.kind != "f" and k.dtype.kind != "f":
            continue
        delta = (k - g).astype(np.float64) if as_recorded else (
            k.astype(np.float64) - g.astype(np.float64))
        deltas.append(delta.ravel())
    if not deltas:
        return 0.0
    flat = np.concatenate(deltas)
    if not np.isfinite(flat).all():
        return float("nan") if np.isnan(flat).any() else float("inf")
    scale = float(np.max(np.abs(flat))) if flat.size else 0.0
    if scale == 0.0:
        return 0.0
    return scale * float(np.sqrt(np.sum(np.square(flat / scale))))


def _clip(global_model: TensorDict, local_model: TensorDict, factor: float
          ) -> dict[str, np.ndarray]:
    """θ + (θ_k − θ)·factor per tensor (floating tensors; others kept), in the local dtype."""
    out: dict[str, np.ndarray] = {}
    for key, value in local_model.items():
        k = np.asarray(value)
        g = np.asarray(global_model[key])
        if k.dtype.kind != "f":
            out[key] = k
            continue
        delta = k.astype(np.float64) - g.astype(np.float64)
        out[key] = (g.astype(np.float64) + delta * factor).astype(k.dtype)
    return out


def _reported_count(num_examples: object) -> tuple[int | None, str]:
    """The reported count as an exact integer, or ``(None, reason)``."""
    n = num_examples
    if isinstance(n, bool) or not isinstance(n, int | float | np.integer | np.floating):
        return None, f"num-examples = {n!r}: expected a positive integer"
    if isinstance(n, float | np.floating):
        if not math.isfinite(float(n)) or not float(n).is_integer():
            return None, f"num-examples = {n!r}: expected a positive integer"
        n = int(float(n))  # exact: a float that is an integer converts without rounding
    count = int(n)
    if count <= 0:
        return None, f"num-examples = {count}: expected a positive integer"
    return count, ""


def _shown(n: int) -> str:
    """A count as written in messages (exact Decimal formatting: no float overflow)."""
    return format(Decimal(n), ".3e") if n >= 10**12 else str(n)


def cap_examples(
    num_examples: object, recorded_size: int | None, cap: ExampleCap
) -> tuple[int | None, str]:
    """``(count to aggregate with, reason)``; ``(None, reason)`` when refused.

    Exact arithmetic throughout (integers and :class:`fractions.Fraction`): a huge or
    fractional report is compared, not multiplied into a float.
    """
    n, why = _reported_count(num_examples)
    if n is None:
        return None, why
    if recorded_size is None:
        return n, ""
    if isinstance(recorded_size, bool) or not isinstance(recorded_size, int) or recorded_size < 0:
        raise ConfigError(f"recorded data size = {recorded_size!r}: expected an integer >= 0")
    limit = Fraction(cap.factor) * recorded_size
    if n <= limit:
        return n, ""
    allowed = math.floor(limit)
    if cap.policy == "refuse" or allowed < 1:
        return None, (
            f"num-examples = {_shown(n)} exceeds {cap.factor:g} x the client's recorded data "
            f"size {recorded_size} (at most {allowed}): refused"
        )
    return allowed, (
        f"num-examples = {_shown(n)} exceeds {cap.factor:g} x the client's recorded data size "
        f"{recorded_size}: weighted as {allowed}"
    )


def screen_reply(
    global_model: TensorDict,
    local_model: TensorDict,
    num_examples: object,
    recorded_size: int | None,
    policy: RobustPolicy,
) -> ScreenedReply:
    """Screen one train reply under ``policy`` (see the module docstring).

    Parameters
    ----------
    global_model
        :math:`\\theta`, the model sent.
    local_model
        :math:`\\theta_k`, the model the client returned (same keys and shapes).
    num_examples
        The count the client reported (any value: a malformed one is refused, never an
        exception).
    recorded_size
        The client's recorded data size (None: unknown, no cap).
    policy
        The bounds to apply.

    Returns
    -------
    ScreenedReply
        Never raises for anything a client can send; a mismatch of keys or shapes is refused
        with its reason.
    """
    metrics: dict[str, float] = {}
    notes: list[str] = []
    reported, why = _reported_count(num_examples)
    if reported is None:
        return ScreenedReply(False, None, None, why)
    n: int | None = reported
    if policy.examples is not None:
        n, why = cap_examples(reported, recorded_size, policy.examples)
        if n is None:
            return ScreenedReply(False, None, None, why)
        if why:
            notes.append(why)
            metrics["fedforget-reported-examples"] = (
                float(reported) if reported < 10**300 else 1e300
            )
    model = {k: np.asarray(v) for k, v in local_model.items()}
    try:
        norm = update_norm(global_model, model)
    except ConfigError as exc:
        return ScreenedReply(False, None, None, str(exc))
    if not math.isfinite(norm):
        return ScreenedReply(False, None, None, "the update holds NaN or infinite values")
    metrics["fedforget-update-norm"] = norm
    bound = policy.norm
    if bound is not None and norm > bound.max_norm:
        if bound.policy == "refuse":
            return ScreenedReply(
                False, None, None,
                f"update norm {norm:.6g} exceeds the bound {bound.max_norm:g}: refused",
            )
        scale = bound.max_norm / norm
        clipped = _clip(global_model, model, scale)
        # The clipped model is stored in its own dtype (float32): θ + Δ·s rounds, and when θ
        # is large next to Δ·s the rounded update can exceed C by more than float error in
        # Δ alone; the history then records the update θ_k − θ in that dtype too, rounded
        # again. Shrink the scale by the measured excess until both the exact update and
        # the recorded one are within the bound (a few steps at most; deterministic, so
        # replays clip identically), and send no update at all if rounding never allows it.
        for _ in range(8):
            after = max(update_norm(global_model, clipped),
                        update_norm(global_model, clipped, as_recorded=True))
            if after <= bound.max_norm:
                break
            scale *= (bound.max_norm / after) * (1 - 2.0**-20)
            clipped = _clip(global_model, model, scale)
        else:
            scale = 0.0
            clipped = _clip(global_model, model, 0.0)
        model = clipped
        metrics["fedforget-clip-scale"] = scale
        notes.append(f"update norm {norm:.6g} exceeds the bound {bound.max_norm:g}: clipped "
                     f"by {scale:.6g}")
    return ScreenedReply(True, model, n, "; ".join(notes), metrics)

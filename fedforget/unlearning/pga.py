"""PGA: the leaving client undoes its own training by projected gradient ascent.

Halimi, Kadhe, Rawat and Baracaldo, "Federated Unlearning: How to Efficiently Erase a Client
in FL?", 2022, https://arxiv.org/abs/2207.05521.

1. **Reference model.** The average of the other clients' local models of the last round
   :math:`T`, here weighted by example counts (FedAvg's weights; the paper's clients are
   equal-sized, where this is its :math:`\\frac{1}{N-1}(N w^T - w_u^{T})`), derived from the
   stored updates :math:`\\Delta_{T,k} = \\theta_{T,k} - \\theta_{T-1}`:

   .. math::

       w_{\\text{ref}} = \\theta_{T-1} + \\sum_{k \\in P_T \\setminus \\{u\\}}
           \\frac{n_k}{\\sum_{j \\in P_T \\setminus \\{u\\}} n_j}\\,\\Delta_{T,k}.

   If :math:`u` did not take part in round :math:`T`, :math:`\\theta_T` already is that
   average and :math:`w_{\\text{ref}} = \\theta_T`; if it was round :math:`T`'s only
   participant, :math:`w_{\\text{ref}} = \\theta_{T-1}`. When the model in service :math:`M`
   is not :math:`\\theta_T` (an earlier request changed it), the same correction is applied
   to it: :math:`w_{\\text{ref}} = M + (w_{\\text{ref}}(T) - \\theta_T)`.
2. **Ascent** (:mod:`fedforget.unlearning.ascent`, run by the leaving client from
   :math:`w_{\\text{ref}}`): maximise its loss within :math:`\\lVert w - w_{\\text{ref}}
   \\rVert_2 \\le \\delta`, SGD with momentum and clipped gradients, stopping once
   :math:`\\lVert w - w_u^{T} \\rVert_2 > \\tau` (the distance stop of the authors' code,
   :math:`w_u^{T}` the client's own last local model). The server projects the reply onto
   the ball again (it does not trust the client to have done so).
3. **Post-training**: ``post_rounds`` ordinary FedAvg rounds :math:`T+1, \\dots` with the
   run's client sampling minus the leaving client and every client excluded from training
   (``request.exclude``, filled by the service with every withdrawn client, and the run's
   withdrawal ledger: a withdrawn client is never asked to train again), by
   :func:`~fedforget.unlearning.post_training.post_train`.

**The radius.** With ``radius`` 0, as the authors' code computes it,

.. math::

    \\delta = \\sqrt{\\tfrac13 \\cdot \\tfrac{1}{10} \\sum_{i=1}^{10}
        \\lVert w_{\\text{ref}} - w^{(i)}_{\\text{rand}} \\rVert_2^2}

over 10 random initialisations :math:`w^{(i)}_{\\text{rand}}` of the run's model (their
``get_distance`` returns the *squared* norm, its mean over 10 fresh models divided by 3 is
their ``threshold``, and they project onto the sphere of radius ``sqrt(threshold)``). The
random models need fedforget's own task (a :class:`~fedforget.config.RunConfig` in the
history); for another app the one random initialisation the history holds, :math:`\\theta_0`,
stands in for the ten (a deviation, noted in the result).

**The distance stop.** :math:`\\tau` = ``stop_distance``; 0 derives it as
``stop_fraction`` × :math:`\\delta`. The authors' threshold is an absolute 2.2 on the
squared distance for their MNIST CNN (:math:`\\tau = 1.48`, about 0.13 of their radius of
about 11.7 for that network at initialisation scale); an absolute value does not carry
over between models, so the default is a fraction of the radius (see
:class:`PGAParams`). :math:`w_u^{T}` is :math:`\\theta_{t_u-1} + \\Delta_{t_u,u}` of the
client's last round :math:`t_u` (shifted like :math:`w_{\\text{ref}}` when the model in
service is not :math:`\\theta_T`); when that round's updates were not retained the stop is
off (noted).

Defaults: the authors' ascent (5 epochs, learning rate 0.01, momentum 0.9, gradient norm
clipped at 5) and their 10 post-training rounds. Deviations from the authors' code: the
reference is weighted by example counts (theirs has equal parties); the radius's random
models are seeded from the run seed; post-training rounds follow the run's client sampling
and local epochs (theirs: every remaining party, one epoch of at most 50 mini-batches); the
stop threshold is relative to the radius by default.

The ascent message is sent as round :math:`T + 1` (the leaving client's seed for a round it
takes no other part in). The starting point is the model in service before this request
(``request.current_model``, after earlier unlearning), else :math:`\\theta_T`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedforget.config import RunConfig
from fedforget.errors import ConfigError, FedForgetError
from fedforget.history import HistoryStore
from fedforget.sampling import derive_seed
from fedforget.unlearning import ascent
from fedforget.unlearning.base import (
    MethodParams,
    RetentionError,
    TensorDict,
    Unlearner,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
    check_range,
    first_contribution,
    register,
    weighted_sum,
)
from fedforget.unlearning.post_training import post_train

RADIUS_SAMPLES = 10
"""Random initialisations averaged when the radius is derived."""
RADIUS_FRACTION = 1.0 / 3.0
"""Fraction of the mean *squared* distance taken as the squared radius (authors' code)."""
_F32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class PGAParams(MethodParams):
    """PGA's parameters (defaults: the authors' code, see the module docstring).

    Attributes
    ----------
    radius : float
        :math:`\\delta`, the radius of the ball around the reference; 0 derives it.
    ascent_epochs : int
        Passes of the leaving client over its data, ``>= 1``.
    ascent_learning_rate : float
        :math:`\\eta_u > 0`.
    ascent_momentum : float
        SGD momentum of the ascent, in [0, 1).
    ascent_clip_grad_norm : float
        Maximal norm of each ascent mini-batch gradient; 0: no clipping.
    ascent_min_accuracy : float
        Stop the ascent once the client's validation accuracy is below this; 0: never.
    stop_distance : float
        :math:`\\tau`: stop the ascent once the model is farther than this (ℓ2) from the
        client's own last local model; 0 derives ``stop_fraction`` × :math:`\\delta`.
    stop_fraction : float
        :math:`\\tau / \\delta` when ``stop_distance`` is 0; 0 with ``stop_distance`` 0 turns
        the distance stop off.
    post_rounds : int
        Ordinary rounds without the client after the ascent, ``>= 0``.
    post_epochs : int
        Local epochs in those rounds; 0: the run's ``local-epochs``.
    """

    radius: float = 0.0
    ascent_epochs: int = 5
    ascent_learning_rate: float = 0.01
    ascent_momentum: float = 0.9
    ascent_clip_grad_norm: float = 5.0
    ascent_min_accuracy: float = 0.0
    stop_distance: float = 0.0
    stop_fraction: float = 0.5
    post_rounds: int = 10
    post_epochs: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter out of range."""
        check_range("radius", self.radius, low=0, high=math.inf, high_open=True)
        check_range("ascent-epochs", self.ascent_epochs, low=1)
        check_range("ascent-learning-rate", self.ascent_learning_rate, low=0, low_open=True,
                    high=math.inf, high_open=True)
        check_range("ascent-momentum", self.ascent_momentum, low=0, high=1, high_open=True)
        check_range("ascent-clip-grad-norm", self.ascent_clip_grad_norm, low=0,
                    high=math.inf, high_open=True)
        check_range("ascent-min-accuracy", self.ascent_min_accuracy, low=0, high=1)
        check_range("stop-distance", self.stop_distance, low=0, high=math.inf, high_open=True)
        check_range("stop-fraction", self.stop_fraction, low=0, high=math.inf, high_open=True)
        check_range("post-rounds", self.post_rounds, low=0)
        check_range("post-epochs", self.post_epochs, low=0)


# ------------------------------------------------------------------------- helpers
def reference_model(
    store: HistoryStore, client: str, *, current: TensorDict | None = None
) -> TensorDict:
    """:math:`w_{\\text{ref}}` for ``client`` (see the module docstring), float32.

    Raises
    ------
    HistoryError
        If round :math:`T`'s updates are needed and were not retained.
    """
    last = store.last_round
    final = store.global_model(last)
    record = store.round(last)
    others = [p for p in record.participants if p.client_id != client]
    if len(others) == len(record.participants):
        ref = final
    elif not others:
        ref = store.global_model(last - 1)
    else:
        before = store.global_model(last - 1)
        total = sum(p.num_examples for p in others)
        terms = [(1.0, before)] + [
            (p.num_examples / total, store.client_update(last, p.client_id)) for p in others
        ]
        ref = weighted_sum(terms, before)
    if current is not None:
        ref = weighted_sum([(1.0, current), (1.0, ref), (-1.0, final)], final)
    return {k: np.asarray(v, dtype=np.float32) for k, v in ref.items()}


def anchor_model(
    store: HistoryStore, client: str, *, current: TensorDict | None = None
) -> tuple[TensorDict | None, int | None]:
    """:math:`w_u^{t_u}`, ``client``'s local model of its last round :math:`t_u`, and
    :math:`t_u`; ``(None, t_u)`` when that round's updates were not retained (``(None,
    None)`` when it never took part). Shifted by :math:`M - \\theta_T` when the model in
    service :math:`M` is given, as the reference is."""
    rounds = store.clients().get(client)
    if not rounds:
        return None, None
    t_u = max(rounds)
    if not store.is_retained(t_u):
        return None, t_u
    anchor = weighted_sum([(1.0, store.global_model(t_u - 1)),
                           (1.0, store.client_update(t_u, client))], store.global_model(t_u - 1))
    if current is not None:
        final = store.global_model(store.last_round)
        anchor = weighted_sum([(1.0, current), (1.0, anchor), (-1.0, final)], final)
    return {k: np.asarray(v, dtype=np.float32) for k, v in anchor.items()}, t_u


def distance(a: TensorDict, b: TensorDict) -> float:
    """:math:`\\lVert a - b \\rVert_2` over all tensors, in float64."""
    return math.sqrt(sum(float(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2)) for k in a))


def _norm(a: TensorDict) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in a.values()))


def project(model: TensorDict, centre: TensorDict, radius: float) -> TensorDict:
    """The projection of ``model`` onto the ball of ``radius`` around ``centre``, float32."""
    norm = distance(model, centre)
    scale = 1.0 if norm <= radius else radius / norm
    return {k: (np.asarray(centre[k], np.float64)
                + scale * (np.asarray(model[k], np.float64) - centre[k])).astype(np.float32)
            for k in centre}


def radius_from_distances(distances: list[float]) -> float:
    """:math:`\\delta = \\sqrt{\\overline{d^2} / 3}` (RADIUS_FRACTION = 1/3, authors' code)."""
    return math.sqrt(RADIUS_FRACTION * float(np.mean(np.square(distances))))


def derive_radius(reference: TensorDict, run_config: RunConfig) -> float:
    """:math:`\\delta` from RADIUS_SAMPLES random initialisations of the run's model (seeds
    derived from the run's): :math:`\\sqrt{\\overline{\\lVert w_{ref} - w_{rand}
    \\rVert^2} / 3}`."""
    from fedforget.arrays import model_tensors
    from fedforget.models import build_model
    from fedforget.task import load_test_set

    test = load_test_set(run_config)
    options = {"hidden_size": run_config.hidden_size} if run_config.model == "mlp" else {}
    distances = []
    for i in range(RADIUS_SAMPLES):
        model = build_model(run_config.model, input_shape=test.input_shape,
                            num_classes=test.num_classes,
                            seed=derive_seed(run_config.seed, "pga-radius", i), **options)
        tensors = model_tensors(model)
        if set(tensors) != set(reference):
            raise UnlearningError(
                f"the run's model {run_config.model!r} has tensors {sorted(tensors)}, the "
                f"history's {sorted(reference)}; cannot derive the radius, set radius > 0"
            )
        distances.append(distance(tensors, reference))
    return radius_from_distances(distances)


def _radius(store: HistoryStore, reference: TensorDict) -> tuple[float, str]:
    """The derived radius and how it was derived (RunConfig's model, else θ_0)."""
    try:
        cfg = RunConfig.from_mapping(store.run_config)
    except ConfigError:
        cfg = None
    if cfg is not None:
        try:
            return derive_radius(reference, cfg), (
                f"sqrt(mean squared distance to {RADIUS_SAMPLES} random initialisations / 3)")
        except FedForgetError:
            pass
    theta0 = {k: v for k, v in store.global_model(0).items() if k in reference}
    return radius_from_distances([distance(theta0, reference)]), (
        "sqrt(squared distance to the history's initial model θ_0 / 3): the run's model "
        "could not be rebuilt, so θ_0 stands in for the random initialisations")


# -------------------------------------------------------------------------- method
@register
class PGA(Unlearner[PGAParams]):
    """Projected gradient ascent by the leaving client, then ordinary rounds (Halimi et al.)."""

    name = "pga"
    version = "2"
    multi_client = False
    Params = PGAParams

    def check(self, request: UnlearningRequest) -> None:
        """Refuse a client that no longer answers, or a history that cannot give w_ref."""
        super().check(request)
        store = request.store
        if len(request.forget) != 1:
            raise UnlearningError("pga forgets exactly one client per request; got none")
        (client,) = request.forget
        if client not in request.federation.roster:
            raise UnlearningError(
                f"pga needs the leaving client to run the gradient ascent itself, but "
                f"{client!r} is not in the federation's roster; expected a client that still "
                "answers (use another method for a client that has gone)"
            )
        if first_contribution(store, [client]) is None:
            return
        last = store.last_round
        if client in store.round(last).client_ids and not store.is_retained(last):
            raise RetentionError(
                f"pga forms the reference model from the client updates of the last round "
                f"{last}, but retain_interval {store.retain_interval} did not keep them; "
                f"expected a history whose last round is retained (rounds 1, "
                f"{1 + store.retain_interval}, {1 + 2 * store.retain_interval}, ...)"
            )

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Reference, ascent by the leaving client, post-training rounds."""
        store, federation = request.store, request.federation
        params = self.params
        (client,) = request.forget
        last = store.last_round
        current = request.current_model
        base = store.global_model(last) if current is None else current
        first = first_contribution(store, [client])
        if first is None:
            return UnlearningResult(
                model={k: np.asarray(v, dtype=np.float32) for k, v in base.items()},
                cost=federation.cost, rounds_affected=[],
                notes=[f"client {client!r} never took part; the model is unchanged"],
            )
        w_ref = reference_model(store, client, current=current)
        notes = [f"started from the {'model in service' if current is not None else 'θ_T'}; "
                 f"reference: the other clients' models of round {last} (weighted by "
                 "example counts)"]
        if params.radius:
            radius = params.radius
            notes.append(f"radius δ = {radius:.6g} (set)")
        else:
            radius, how = _radius(store, w_ref)
            notes.append(f"radius δ = {radius:.6g} = {how}")
        anchor, t_u = anchor_model(store, client, current=current)
        stop = params.stop_distance or params.stop_fraction * radius
        if stop and anchor is None:
            notes.append(f"distance stop off: the updates of {client!r}'s last round {t_u} "
                         "were not retained, so its last local model is unknown")
            stop = 0.0
        elif stop:
            notes.append(f"distance stop τ = {stop:.6g} from {client!r}'s local model of "
                         f"round {t_u}" + ("" if params.stop_distance else
                                           f" ({params.stop_fraction} × δ)"))

        replies = federation.train(
            server_round=last + 1, global_model=w_ref, clients=[client],
            local_epochs=params.ascent_epochs, task=ascent.TASK,
            extra_config=ascent.ascent_config(
                radius=radius, learning_rate=params.ascent_learning_rate,
                clip_grad_norm=params.ascent_clip_grad_norm,
                min_accuracy=params.ascent_min_accuracy, momentum=params.ascent_momentum,
                stop_distance=stop, anchor=anchor if stop else None,
            ),
        )
        if client not in replies:
            raise UnlearningError(
                f"client {client!r} did not return the result of its gradient ascent; "
                "nothing was changed"
            )
        reply = replies[client]
        if set(reply.local_model) != set(w_ref):
            raise UnlearningError(
                f"client {client!r} returned tensors {sorted(reply.local_model)}; expected "
                f"the model's {sorted(w_ref)}"
            )
        found = distance(reply.local_model, w_ref)
        model = project(reply.local_model, w_ref, radius)
        rounding = 2 * _F32_EPS * (_norm(w_ref) + radius)  # float32 rounding on the sphere
        if found > radius + rounding:
            notes.append(f"the client's model lay {found:.6g} from the reference, outside "
                         f"the ball; projected back to {radius:.6g}")
        request.report(last, model)  # the ascent's model takes θ_T's place
        metrics = dict(reply.metrics)
        notes.append(f"ascent by {client!r}: {metrics.get('pga-steps', '?')} steps, "
                     f"loss {metrics.get('train-loss', '?')}, distance to the reference "
                     f"{found:.6g}, stopped early: {bool(metrics.get('pga-stopped-early', 0))}"
                     + (" (distance stop)" if metrics.get("pga-stopped-by-distance") else ""))
        model = post_train(request, model, rounds=params.post_rounds,
                           local_epochs=params.post_epochs or None, notes=notes)
        return UnlearningResult(model=model, cost=federation.cost,
                                rounds_affected=list(range(first, last + 1)), notes=notes)

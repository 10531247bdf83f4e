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
   \\rVert_2 \\le \\delta`. With ``radius`` 0, :math:`\\delta` is a third of the mean distance
   from :math:`w_{\\text{ref}}` to 10 random initialisations of the run's model, as in the
   authors' code. The server projects the reply onto the ball again (it does not trust the
   client to have done so).
3. **Post-training**: ``post_rounds`` ordinary FedAvg rounds :math:`T+1, \\dots` with the
   run's client sampling minus the leaving client and every client that withdrew before
   (read from the run's withdrawal ledger: a withdrawn client is never asked to train again).

The ascent message is sent as round :math:`T + 1` (the leaving client's seed for a round it
takes no other part in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedforget.config import RunConfig
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.sampling import ClientSampler, derive_seed
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

RADIUS_SAMPLES = 10
"""Random initialisations averaged when the radius is derived."""
RADIUS_FRACTION = 1.0 / 3.0
"""Fraction of their mean distance taken as the radius."""
_F32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class PGAParams(MethodParams):
    """PGA's parameters.

    Attributes
    ----------
    radius : float
        :math:`\\delta`, the radius of the ball around the reference; 0 derives it.
    ascent_epochs : int
        Passes of the leaving client over its data, ``>= 1``.
    ascent_learning_rate : float
        :math:`\\eta_u > 0`.
    ascent_clip_grad_norm : float
        Maximal norm of each ascent mini-batch gradient; 0: no clipping.
    ascent_min_accuracy : float
        Stop the ascent once the client's validation accuracy is below this; 0: never.
    post_rounds : int
        Ordinary rounds without the client after the ascent, ``>= 0``.
    post_epochs : int
        Local epochs in those rounds; 0: the run's ``local-epochs``.
    """

    radius: float = 0.0
    ascent_epochs: int = 1
    ascent_learning_rate: float = 0.01
    ascent_clip_grad_norm: float = 1.0
    ascent_min_accuracy: float = 0.0
    post_rounds: int = 2
    post_epochs: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter out of range."""
        check_range("radius", self.radius, low=0, high=math.inf, high_open=True)
        check_range("ascent-epochs", self.ascent_epochs, low=1)
        check_range("ascent-learning-rate", self.ascent_learning_rate, low=0, low_open=True,
                    high=math.inf, high_open=True)
        check_range("ascent-clip-grad-norm", self.ascent_clip_grad_norm, low=0,
                    high=math.inf, high_open=True)
        check_range("ascent-min-accuracy", self.ascent_min_accuracy, low=0, high=1)
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


def _withdrawn(store: HistoryStore) -> frozenset[str]:
    """Every client that asked to leave this run (the ledger shares the store's index)."""
    from fedforget.withdrawal import WithdrawalLedger

    with WithdrawalLedger(store.directory) as ledger:
        return ledger.withdrawn()


def derive_radius(reference: TensorDict, run_config: RunConfig) -> float:
    """:math:`\\delta` = RADIUS_FRACTION × the mean distance from ``reference`` to
    RADIUS_SAMPLES random initialisations of the run's model (seeds derived from the run's)."""
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
    return RADIUS_FRACTION * float(np.mean(distances))


# -------------------------------------------------------------------------- method
@register
class PGA(Unlearner[PGAParams]):
    """Projected gradient ascent by the leaving client, then ordinary rounds (Halimi et al.)."""

    name = "pga"
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
        try:
            RunConfig.from_mapping(store.run_config)
        except ConfigError as exc:
            raise UnlearningError(
                f"pga follows the run's client sampling and model, but the history's run "
                f"config is not a fedforget run config: {exc}"
            ) from exc
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
        cfg = RunConfig.from_mapping(store.run_config)
        w_ref = reference_model(store, client, current=current)
        radius = self.params.radius or derive_radius(w_ref, cfg)
        notes = [f"reference: the other clients' models of round {last} "
                 f"(weighted by example counts); radius δ = {radius:.6g}"
                 + ("" if self.params.radius else " (a third of the mean distance to "
                    f"{RADIUS_SAMPLES} random initialisations)")]

        replies = federation.train(
            server_round=last + 1, global_model=w_ref, clients=[client],
            local_epochs=self.params.ascent_epochs, task=ascent.TASK,
            extra_config=ascent.ascent_config(
                radius=radius, learning_rate=self.params.ascent_learning_rate,
                clip_grad_norm=self.params.ascent_clip_grad_norm,
                min_accuracy=self.params.ascent_min_accuracy,
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
                     f"loss {metrics.get('train-loss', '?')}, stopped early: "
                     f"{bool(metrics.get('pga-stopped-early', 0))}")

        sampler = ClientSampler(seed=cfg.seed, count=cfg.clients_per_round())
        epochs = self.params.post_epochs or None
        exclude = request.forget | (_withdrawn(store) if self.params.post_rounds else frozenset())
        for t in range(last + 1, last + 1 + self.params.post_rounds):
            chosen = sampler.sample(t, federation.roster, exclude=exclude)
            updates = federation.train(server_round=t, global_model=model, clients=chosen,
                                       local_epochs=epochs, task="train")
            replied = [updates[c] for c in chosen if c in updates]
            if not replied:
                notes.append(f"post round {t}: no client replied; the model is unchanged")
                continue
            total = sum(u.num_examples for u in replied)
            model = weighted_sum(((u.num_examples / total, u.local_model) for u in replied),
                                 model)
            request.report(t, model)
        if self.params.post_rounds:
            notes.append(f"post-training rounds {last + 1}..{last + self.params.post_rounds}")
        return UnlearningResult(model=model, cost=federation.cost,
                                rounds_affected=list(range(first, last + 1)), notes=notes)

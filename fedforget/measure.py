"""How an unlearning result is measured against the original and the retrained model.

The unlearning service hands every result to a :class:`Measure` with a
:class:`MeasureContext` (the three models, the costs, the federation, the models a method
rebuilt round by round) and stores what it returns as the result's ``metrics``. What can be
measured depends on the app:

* :class:`EvaluateFnMeasure`, for any Flower app: the app's own central evaluation function
  (the ``evaluate_fn`` of ``strategy.start``) on each model — its ``accuracy`` becomes
  ``test_accuracy`` — the per-round trace with it, and :func:`common_figures`;
* :class:`TaskMeasure`, for fedforget's own task (:mod:`fedforget.task`): the whole protocol
  of :func:`fedforget.evaluation.evaluate_unlearning` (forgotten-data accuracy, backdoor
  success, membership inference, shadow attack, divergences) with the task's data;
* :func:`common_figures`, in both: parameter distances to the retrained model, each
  remaining client's held-out accuracy change (asked of the clients through the
  federation's EVALUATE messages, when there is a federation), speed-ups and storage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedforget.arrays import TensorDict, load_tensors, model_tensors, to_array_record
from fedforget.canonical import canonical_dumps
from fedforget.comparison import speedups
from fedforget.config import RunConfig
from fedforget.data import ArrayDataset
from fedforget.erasure import ErasureScope
from fedforget.evaluation import client_impact, cosine_distance, l2_distance
from fedforget.history import HistoryStore
from fedforget.progress import phase
from fedforget.rundir import RunDirectory
from fedforget.sampling import derive_seed
from fedforget.unlearning.base import Cost, Federation

if TYPE_CHECKING:
    from fedforget.withdrawal import WithdrawalRequest

__all__ = [
    "EvaluateFnMeasure",
    "Measure",
    "MeasureContext",
    "TaskMeasure",
    "TaskServerSide",
    "common_figures",
]

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]
"""A Flower central evaluation function, as ``strategy.start(evaluate_fn=...)`` takes."""


@dataclass(frozen=True)
class MeasureContext:
    """Everything a measure may use (models as numpy tensor dicts)."""

    store: HistoryStore
    federation: Federation | None
    forget: frozenset[str]
    not_remaining: frozenset[str]
    original: TensorDict
    unlearned: TensorDict
    retrained: TensorDict | None
    method_cost: Cost
    retrain_cost: Cost | None
    trace: Sequence[tuple[int, TensorDict]] = field(default_factory=list)
    # the records and classes in force, and the request served (its kind, its records)
    scope: ErasureScope = field(default_factory=ErasureScope)
    request: WithdrawalRequest | None = None
    impact_clients: int = 0  # remaining clients asked for the per-client impact (0: all)
    seed: int = 0  # the run seed (seeds that sample)
    progress: bool = False  # announce the long phases on stderr

    @property
    def kind(self) -> str:
        """The size of the request: ``client``, ``records`` or ``class``."""
        return self.request.kind if self.request is not None else "client"

    def models(self) -> dict[str, TensorDict]:
        """``{"original", "unlearned"[, "retrained"]}``."""
        out = {"original": self.original, "unlearned": self.unlearned}
        if self.retrained is not None:
            out["retrained"] = self.retrained
        return out

    def remaining(self) -> list[str]:
        """The clients that stay: the federation's roster minus ``not_remaining``."""
        roster = self.federation.roster if self.federation is not None else self.store.roster()
        return [cid for cid in roster if cid not in self.not_remaining]

    def impact_sample(self) -> list[str]:
        """The remaining clients asked for the per-client impact: all of them, or a sample
        of ``impact_clients`` drawn without replacement by a generator seeded from the run
        seed (the same clients for every method of a run), sorted."""
        remaining = self.remaining()
        if not 0 < self.impact_clients < len(remaining):
            return remaining
        rng = np.random.default_rng(derive_seed(self.seed, "impact-sample"))
        chosen = rng.choice(len(remaining), size=self.impact_clients, replace=False)
        return sorted(remaining[int(i)] for i in chosen)


class Measure(Protocol):
    """``measure(context) -> metrics`` (a JSON-ready dict)."""

    def __call__(self, ctx: MeasureContext) -> dict[str, Any]: ...


def _cosine_or_none(a: TensorDict, b: TensorDict) -> float | None:
    if not all(any(np.any(np.asarray(v) != 0) for v in m.values()) for m in (a, b)):
        return None
    return cosine_distance(a, b)


def common_figures(ctx: MeasureContext, *, with_clients: bool = True) -> dict[str, Any]:
    """What every app gets: distances to the retrained model, per-client impact (if there
    is a federation to ask), speed-ups and the history's storage."""
    out: dict[str, Any] = {
        "l2_to_retrained": None, "cosine_to_retrained": None,
        "client_impact": None, "client_accuracy": None,
    }
    if ctx.retrained is not None:
        pair = {"original": ctx.original, "unlearned": ctx.unlearned}
        out["l2_to_retrained"] = {k: l2_distance(v, ctx.retrained) for k, v in pair.items()}
        out["cosine_to_retrained"] = {k: _cosine_or_none(v, ctx.retrained)
                                      for k, v in pair.items()}
    remaining = ctx.impact_sample()
    out["client_impact_sample"] = None
    if with_clients and ctx.federation is not None and remaining:
        if len(remaining) < len(ctx.remaining()):
            out["client_impact_sample"] = {"asked": len(remaining),
                                           "remaining": len(ctx.remaining()),
                                           "seed": ctx.seed}
        with phase(f"per-client impact: {len(remaining)} clients evaluate both models",
                   enabled=ctx.progress):
            before = ctx.federation.evaluate_local(ctx.original, remaining)
            after = ctx.federation.evaluate_local(ctx.unlearned, remaining)
        answered = sorted(set(before) & set(after))
        if answered:
            b = {cid: before[cid] for cid in answered}
            a = {cid: after[cid] for cid in answered}
            out["client_impact"] = client_impact(b, a).to_dict()
            out["client_accuracy"] = {"original": b, "unlearned": a}
    if ctx.retrain_cost is not None:
        out.update(speedups(ctx.method_cost, ctx.retrain_cost))
    else:
        out.update({"speedup_wall": None, "speedup_client_epochs": None})
    out["storage_bytes"] = ctx.store.bytes_stored()
    return out


def _metric_name(key: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", key).strip("_").lower()


class EvaluateFnMeasure:
    """The measure of any Flower app: its central evaluation function on each model.

    Every metric ``m`` the function returns becomes ``metrics["app_<m>"]`` =
    ``{"original", "unlearned", "retrained"}``; ``accuracy`` (or ``acc``) is also
    ``test_accuracy``. Without an evaluation function only :func:`common_figures` remain.
    """

    def __init__(self, evaluate_fn: EvaluateFn | None, *, final_round: int = 0) -> None:
        self.evaluate_fn = evaluate_fn
        self.final_round = final_round

    def _evaluate(self, t: int, model: TensorDict) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        record = self.evaluate_fn(t, to_array_record(model))
        return {} if record is None else {str(k): float(v) for k, v in record.items()
                                          if isinstance(v, int | float)}

    def __call__(self, ctx: MeasureContext) -> dict[str, Any]:  # noqa: D102
        t = ctx.store.last_round
        per_model = {name: self._evaluate(t, m) for name, m in ctx.models().items()}
        figures: dict[str, Any] = {}
        for key in sorted({k for values in per_model.values() for k in values}):
            figures[f"app_{_metric_name(key)}"] = {
                name: values[key] for name, values in per_model.items() if key in values}
        accuracy_key = next((k for k in ("accuracy", "acc") if f"app_{k}" in figures), None)
        figures["test_accuracy"] = figures[f"app_{accuracy_key}"] if accuracy_key else None
        trace = []
        if accuracy_key is not None:
            for r, model in ctx.trace:
                value = self._evaluate(r, model).get(accuracy_key)
                if value is not None:
                    trace.append({"round": int(r), "test_accuracy": value})
        return {**figures, **common_figures(ctx), "trace": trace}


class TaskServerSide:
    """What the server holds of fedforget's own task (:class:`~fedforget.unlearning.base.
    ServerSideTask`): the run's model and the proxy set ``proxy-fraction`` carves out of the
    global test split (:func:`fedforget.task.load_proxy_set`)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def new_model(self) -> Any:
        """The run's model, initialised from the run seed."""
        from fedforget.task import new_model

        return new_model(self.cfg)

    def proxy_data(self) -> ArrayDataset | None:
        """The proxy set, or None when ``proxy-fraction`` is 0."""
        from fedforget.task import load_proxy_set

        return load_proxy_set(self.cfg)


class TaskMeasure:
    """The whole protocol for fedforget's own task (data and model from a RunConfig).

    In a simulation (fedforget's in-process Grid, Flower's simulation engine) the
    forgotten clients' training data (members of the attacks) and held-out data
    (non-members) are rebuilt from the run config, as the server can build every client's
    partition. In a deployment (``on_clients``; by default: when the federation's Grid is a
    SuperLink's) the server holds no client data: the forgotten-data figures
    (``forgotten_accuracy``, ``mia_loss_auc``, ``mia_confidence_auc``) are computed on each
    forgotten client's node if it consents (:mod:`fedforget.evaluation.on_client`), else
    reported as not available (None); the shadow-model attack, which needs those data on the
    server, is not available either (``shadow_attack`` None). Figures on the server's own
    test set (test accuracy, backdoor success, divergences) are computed as in simulation.

    Members are the data each forgotten client *trained on*: a client that planted a
    backdoor trained on its poisoned copy, so the poisoned examples are members too, and the
    clean and poisoned subsets are also reported apart (the poisoned ones against held-out
    examples carrying the same trigger and label). The membership figures are measured on
    balanced sets (the larger side subsampled to the smaller's size, seeded) with
    ``resamples`` stratified bootstrap resamples (intervals, and the paired difference to
    the retrained model marked within noise or not). Three attacks: the loss and confidence
    thresholds, the shadow-model attack (Shokri et al.: a shadow of the run's model trained
    on half of the test set, logistic regression) and FedEraser's attack (the original
    global model as shadow, fitted on the remaining clients' training data against the test
    set, gradient boosting; in simulation only).
    """

    def __init__(self, cfg: RunConfig, *, shadow_attack: bool = True,
                 on_clients: bool | None = None, original_model_attack: bool = True,
                 resamples: int = 1000, cache: Path | None = None) -> None:
        self.cfg = cfg
        self.shadow_attack = shadow_attack
        self.on_clients = on_clients
        self.original_model_attack = original_model_attack
        self.resamples = resamples
        self.cache = cache  # where the trained shadow model is kept (a run directory)
        self.server_side = TaskServerSide(cfg)  # the service hands it to server-side repairs

    def _remote(self, ctx: MeasureContext) -> bool:
        if self.on_clients is not None:
            return self.on_clients
        from fedforget.evaluation.on_client import is_deployment_grid

        return is_deployment_grid(getattr(ctx.federation, "grid", None))

    def trained_data(self, client_id: str) -> tuple[ArrayDataset, ArrayDataset,
                                                    np.ndarray] | None:
        """``client_id``'s (training data as it trained on it, held-out data, mask of the
        poisoned training examples); None for an id that names no partition of this run."""
        from fedforget.data import poison
        from fedforget.data.backdoor import poison_indices
        from fedforget.sampling import derive_seed
        from fedforget.task import client_partition, load_client_data

        partition = client_partition(client_id)
        if partition is None or partition >= self.cfg.num_clients:
            return None
        train, held = load_client_data(self.cfg, partition)
        mask = np.zeros(len(train), dtype=bool)
        if client_id in self.cfg.backdoor_client_ids():
            seed = derive_seed(self.cfg.seed, "backdoor", client_id)  # as the ClientApp does
            train = poison(train, target_label=self.cfg.backdoor_target,
                           fraction=self.cfg.backdoor_fraction, seed=seed)
            mask[poison_indices(len(mask), fraction=self.cfg.backdoor_fraction,
                                seed=seed)] = True
        return train, held, mask

    def forgotten_data(self, forget: Collection[str]
                       ) -> tuple[ArrayDataset | None, ArrayDataset | None]:
        """The forgotten clients' training data (as trained on, poisoned examples included)
        and their held-out data, each pooled; None where there is no example."""
        members, holdout, _ = self._forgotten(forget)
        return members, holdout

    def _forgotten(self, forget: Collection[str]
                   ) -> tuple[ArrayDataset | None, ArrayDataset | None, np.ndarray | None]:
        found = [d for d in (self.trained_data(cid) for cid in sorted(forget)) if d is not None]
        members = _pooled([t for t, _, _ in found], "forgotten")
        mask = np.concatenate([m for t, _, m in found if len(t)]) if members is not None else None
        return members, _pooled([h for _, h, _ in found], "forgotten-holdout"), mask

    def _original_attack(self, ctx: MeasureContext, test_set: ArrayDataset) -> Any:
        """FedEraser's attack on the original model, fitted on the remaining clients' data;
        kept in the run directory (``unlearned/original-attack-<key>/``) when this measure
        has one, the key binding the run's configuration, the original model's digest and
        the remaining clients, so that every method of one request faces the same attacker
        fitted once."""
        from fedforget.arrays import load_tensors
        from fedforget.evaluation import OriginalModelAttack
        from fedforget.evaluation.membership import attack_recipe
        from fedforget.sampling import derive_seed
        from fedforget.task import new_model
        from fedforget.tensors import tensors_digest

        remaining = ctx.remaining()
        seed = derive_seed(self.cfg.seed, "original-attack") % 2**32
        directory = None
        fitted_on = {"training": self.cfg.training_mapping(), "seed": seed,
                     "original-model": tensors_digest(ctx.original), "members": remaining,
                     "recipe": attack_recipe("original-model")}
        if self.cache is not None:
            key = _fitted_on_digest(fitted_on)[:16]
            directory = RunDirectory(self.cache).unlearned / f"original-attack-{key}"
            kept = kept_attack(directory, fitted_on)
            if kept is not None:
                return OriginalModelAttack(**kept)
        staying = [d for d in (self.trained_data(cid) for cid in remaining) if d is not None]
        members = _pooled([t for t, _, _ in staying], "remaining-train")
        if members is None:
            return None
        attack = OriginalModelAttack.fit_on_original(
            original=load_tensors(new_model(self.cfg), ctx.original), members=members,
            non_members=test_set, seed=seed)
        if directory is not None:
            keep_attack(directory, attack, fitted_on)
        return attack

    def request_data(self, ctx: MeasureContext
                     ) -> tuple[ArrayDataset | None, ArrayDataset | None]:
        """The forgotten data of the request served, as members and non-members of the
        attacks: the forgotten clients' training and held-out data; for a record request,
        its records and the client's held-out data; for a class request, every client's
        training and held-out examples of the labels."""
        from fedforget.erasure import select_records
        from fedforget.task import client_partition, load_client_data

        request = ctx.request
        if request is None or request.kind == "client":
            return self.forgotten_data(ctx.forget)
        if request.kind == "records":
            partition = client_partition(request.client_id)
            if partition is None or partition >= self.cfg.num_clients:
                return None, None
            train, held = load_client_data(self.cfg, partition)
            return select_records(train, request.record_ids), held
        labels = np.asarray(request.labels, dtype=np.int64)
        splits = [load_client_data(self.cfg, p) for p in range(self.cfg.num_clients)]
        return (_pooled([d.subset(np.isin(d.y, labels)) for d, _ in splits], "forgotten"),
                _pooled([h.subset(np.isin(h.y, labels)) for _, h in splits],
                        "forgotten-holdout"))

    def __call__(self, ctx: MeasureContext) -> dict[str, Any]:  # noqa: D102
        from fedforget.data import poison
        from fedforget.evaluation import accuracy_trace, evaluate_unlearning, run_shadow_attack
        from fedforget.sampling import derive_seed
        from fedforget.task import load_test_set, new_model

        cfg = self.cfg
        test_set = load_test_set(cfg)
        remote = self._remote(ctx)
        request = ctx.request
        mask = None
        if remote:
            members, non_members = None, None
        elif request is None or request.kind == "client":
            members, non_members, mask = self._forgotten(ctx.forget)
        else:
            members, non_members = self.request_data(ctx)
        usable = members is not None and non_members is not None
        shadow = None
        if self.shadow_attack and usable:
            if self.cache is None:
                with phase("shadow attack: training the shadow model", enabled=ctx.progress):
                    shadow = run_shadow_attack(cfg, test_set)
            else:
                shadow = cached_shadow_attack(cfg, test_set, RunDirectory(self.cache),
                                              progress=ctx.progress)
        original_attack = None
        if self.original_model_attack and usable:
            with phase("FedEraser's attack: the original model as shadow",
                       enabled=ctx.progress):
                original_attack = self._original_attack(ctx, test_set)
        backdoor = ctx.forget & cfg.backdoor_client_ids()
        poisoned_holdout = None
        if backdoor and non_members is not None and mask is not None:
            poisoned_holdout = poison(non_members, target_label=cfg.backdoor_target,
                                      fraction=1.0, seed=0)
        scratch = new_model(cfg)
        common = common_figures(ctx)
        with phase("evaluation: test set, forgotten data, attacks, divergences",
                   enabled=ctx.progress):
            figures = evaluate_unlearning(
                model=scratch, original=ctx.original, unlearned=ctx.unlearned,
                retrained=ctx.retrained, test_set=test_set, forgotten=members,
                holdout=non_members,
                backdoor_target=cfg.backdoor_target if backdoor else None,
                shadow=shadow, original_attack=original_attack,
                forgotten_poisoned=mask if backdoor and mask is not None else None,
                poisoned_holdout=poisoned_holdout,
                resamples=self.resamples, seed=derive_seed(cfg.seed, "mia-bootstrap") % 2**32,
                balance=True,
            )
        if ctx.kind == "class" and ctx.request is not None:
            figures.update(class_figures(scratch, ctx, test_set, ctx.request.labels))
        figures["collateral"] = collateral_figures(ctx, cfg, scratch, members, test_set)
        figures["group_accuracy"] = group_accuracy(ctx, cfg, scratch)
        if remote:  # no client data on the server: ask the forgotten clients' nodes
            from fedforget.evaluation.on_client import ask_forgotten_figures

            if ctx.federation is not None:
                figures.update(ask_forgotten_figures(ctx.federation, ctx.models(), ctx.forget))
            else:
                figures["forgotten_figures"] = {"source": "not available: no federation",
                                                "answered": [], "missing": {}}
        # the client figures are common's (asked once of the clients)
        return {**figures, **common, "trace": accuracy_trace(scratch, ctx.trace, test_set)}


def collateral_figures(ctx: MeasureContext, cfg: RunConfig, scratch: Any,
                       forgotten: ArrayDataset | None, test_set: ArrayDataset
                       ) -> dict[str, Any] | None:
    """Who else is hurt (:mod:`fedforget.evaluation.collateral`): each remaining client's
    (of the impact sample, :meth:`MeasureContext.impact_sample`) accuracy change against
    its similarity to the forgotten data, from the clients' own
    evaluations (:mod:`fedforget.evaluation.profile`). The probe of the forgotten data is
    built here from the data the simulation can rebuild (``forgotten``). None without a
    federation or a remaining client."""
    from fedforget.arrays import load_tensors
    from fedforget.evaluation.collateral import ClientProfile, collateral_report
    from fedforget.evaluation.profile import (
        ask_probe,
        ask_profiles,
        make_probe,
        mean_representation,
    )
    from fedforget.task import client_group, client_partition

    # The same seeded sample of the remaining clients as the per-client impact (every one
    # in a federation of at most impact_clients): at 1,000 clients, asking each of them
    # twice would cost more than the unlearning.
    remaining = ctx.impact_sample()
    if ctx.federation is None or not remaining:
        return None
    probe = None
    original = load_tensors(scratch, ctx.original)
    if forgotten is not None and len(forgotten):
        probe = make_probe(original, forgotten, test_set)
    elif ctx.kind == "client" and ctx.request is not None and \
            ctx.request.client_id in ctx.federation.roster:
        # the data cannot be rebuilt here: the departing client answers its own probe
        probe = ask_probe(ctx.federation, ctx.original, ctx.request.client_id,
                          mean_representation(original, test_set).tolist())
    with phase(f"collateral: {len(remaining)} clients profile both models",
               enabled=ctx.progress):
        before = ask_profiles(ctx.federation, ctx.original, remaining, probe)
        after = ask_profiles(ctx.federation, ctx.unlearned, remaining, None)
    profiles = []
    for cid in remaining:
        b, a = before.get(cid, {}), after.get(cid, {})
        if "accuracy" not in b or "accuracy" not in a:
            continue
        partition = client_partition(cid)
        group = (client_group(cfg, partition) if cfg.groups and partition is not None
                 and partition < cfg.num_clients else None)
        profiles.append(ClientProfile(
            client_id=cid, accuracy_before=b["accuracy"], accuracy_after=a["accuracy"],
            num_examples=int(b.get("profile-examples", 0)),
            label_similarity=b.get("label-similarity"),
            representation_similarity=b.get("representation-similarity"), group=group))
    if not profiles:
        return None
    report = collateral_report(profiles).to_dict()
    forgotten_groups = sorted({client_group(cfg, p) for c in ctx.forget
                               if (p := client_partition(c)) is not None
                               and p < cfg.num_clients}) if cfg.groups else []
    report["forgotten_groups"] = forgotten_groups
    report["source"] = "the clients' own evaluations (profile task)"
    return report


def group_accuracy(ctx: MeasureContext, cfg: RunConfig, scratch: Any
                   ) -> dict[str, dict[str, float]] | None:
    """With client groups: each model's accuracy on the whole test set in each group's
    accent (server-side: the test set is the server's)."""
    from fedforget.data.groups import group_test_set
    from fedforget.evaluation import accuracy
    from fedforget.task import load_plain_test_set

    if not cfg.groups:
        return None
    plain = load_plain_test_set(cfg)
    return {str(g): {name: accuracy(scratch, tensors,
                                    group_test_set(plain, g, cfg.group_shift, cfg.seed))
                     for name, tensors in ctx.models().items()}
            for g in range(len(cfg.group_sizes()))}


def class_figures(scratch: Any, ctx: MeasureContext, test_set: ArrayDataset,
                  labels: Collection[int]) -> dict[str, Any]:
    """Accuracy on the test examples of the forgotten labels (goal: retraining's level,
    about 0) and on the others (goal: within a point of retraining), per model."""
    from fedforget.evaluation import accuracy

    chosen = np.isin(test_set.y, np.asarray(sorted(labels), dtype=np.int64))
    parts = {"forgotten_class_accuracy": test_set.subset(chosen),
             "retained_class_accuracy": test_set.subset(~chosen)}
    return {name: ({model: accuracy(scratch, tensors, data)
                    for model, tensors in ctx.models().items()} if len(data) else None)
            for name, data in parts.items()}


def _pooled(parts: list[ArrayDataset], name: str) -> ArrayDataset | None:
    parts = [d for d in parts if len(d)]
    if not parts:
        return None
    ids = (None if any(d.ids is None for d in parts)
           else np.concatenate([d.ids for d in parts if d.ids is not None]))
    return ArrayDataset(x=np.concatenate([d.x for d in parts]),
                        y=np.concatenate([d.y for d in parts]),
                        num_classes=parts[0].num_classes, name=name, ids=ids)


def parameter_measure(ctx: MeasureContext) -> dict[str, Any]:
    """The measure when no app is there (a server-side method run by the CLI alone):
    :func:`common_figures` without client evaluation."""
    return {**common_figures(ctx, with_clients=False), "test_accuracy": None, "trace": []}



def cached_shadow_attack(cfg: RunConfig, test_set: ArrayDataset, run: RunDirectory, *,
                         progress: bool = False) -> Any:
    """:func:`fedforget.evaluation.run_shadow_attack` of ``cfg``, its shadow model trained
    once per run directory and kept (``unlearned/shadow-<key>/``).

    The shadow model depends on nothing but the run's configuration (the attacker trains
    the run's architecture on half of the test set, seeded from the run seed), so every
    method and every request of a run faces the same attacker: the model trained for the
    first is stored (fp32, with its digest), and so is the attack model fitted on its
    features (as plain arrays, :func:`keep_attack`); later ones load both, without
    scikit-learn. The recipe is ``run_shadow_attack``'s; a test checks that both give the
    same attack.
    """
    from fedforget.evaluation.membership import (
        ATTACK_RECIPE_VERSION,
        ShadowAttack,
        attack_recipe,
    )
    from fedforget.evaluation.suite import SHADOW_EPOCHS, shadow_halves
    from fedforget.fileio import write_atomic
    from fedforget.task import new_model
    from fedforget.tensors import decode, encode, sha256_digest
    from fedforget.training import train_local

    # The shadow model is trained by this recipe under this PyTorch: another version of
    # either trains (and keeps) another one.
    key = hashlib.sha256(canonical_dumps({
        "training": cfg.training_mapping(), "shadow-epochs": SHADOW_EPOCHS,
        "recipe": ATTACK_RECIPE_VERSION, "torch": torch.__version__})).hexdigest()[:12]
    directory = run.shadow_dir(key)
    model_path, record_path = directory / "model.fft", directory / "shadow.json"
    seed = derive_seed(cfg.seed, "shadow-attack", "attack") % 2**32
    recipe = attack_recipe("shadow")
    cached: TensorDict | None = None
    model_digest = ""
    if model_path.exists() and record_path.exists():
        data = model_path.read_bytes()
        digest = sha256_digest(data)
        if json.loads(record_path.read_text()).get("model_digest") == digest:
            cached, model_digest = decode(data), digest
            kept = kept_attack(directory, {"shadow-model": digest, "seed": seed,
                                           "recipe": recipe})
            if kept is not None:  # the attack model fitted on this shadow, kept too
                return ShadowAttack(**kept)
    shadow_train, shadow_out = shadow_halves(
        test_set, derive_seed(cfg.seed, "shadow-attack", "split"))

    def train(shadow: torch.nn.Module, data: ArrayDataset) -> None:
        nonlocal model_digest
        if cached is not None:
            load_tensors(shadow, cached)
            return
        with phase("shadow attack: training the shadow model (kept for the run's later "
                   "measurements)", enabled=progress):
            train_local(shadow, data, epochs=SHADOW_EPOCHS, learning_rate=cfg.learning_rate,
                        batch_size=cfg.batch_size,
                        seed=derive_seed(cfg.seed, "shadow-attack", "train"))
        blob = encode(model_tensors(shadow), "fp32")
        model_digest = sha256_digest(blob)
        write_atomic(model_path, blob)
        write_atomic(record_path, json.dumps({"model_digest": model_digest,
                                              "shadow_epochs": SHADOW_EPOCHS,
                                              "training": cfg.training_mapping()},
                                             indent=2, sort_keys=True))

    attack = ShadowAttack.fit(
        shadow_train=shadow_train, shadow_out=shadow_out, build_shadow=lambda: new_model(cfg),
        train_shadow=train, seed=seed,
    )
    keep_attack(directory, attack, {"shadow-model": model_digest, "seed": seed,
                                    "recipe": recipe})
    return attack


def kept_attack(directory: Path, fitted_on: dict[str, Any]) -> dict[str, Any] | None:
    """The fields (``classifier``, ``num_classes``, ``threshold``) of the attack kept in
    ``directory`` by :func:`keep_attack` if it was fitted on ``fitted_on`` and its arrays
    match their digest; None otherwise (then the attack is fitted again and kept anew)."""
    from fedforget.evaluation.attack_models import load_scorer
    from fedforget.evaluation.errors import EvaluationError
    from fedforget.tensors import sha256_digest

    record_path, data_path = directory / "attack.json", directory / "attack.npz"
    try:
        record = json.loads(record_path.read_text())
        data = data_path.read_bytes()
        if (not isinstance(record, dict)
                or record.get("fitted_on_digest") != _fitted_on_digest(fitted_on)
                or record.get("attack_digest") != sha256_digest(data)):
            return None
        return {"classifier": load_scorer(data), "num_classes": int(record["num_classes"]),
                "threshold": float(record["threshold"])}
    except (OSError, ValueError, KeyError, TypeError, EvaluationError):
        return None


def _fitted_on_digest(fitted_on: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_dumps(fitted_on)).hexdigest()


def keep_attack(directory: Path, attack: Any, fitted_on: dict[str, Any]) -> None:
    """Keep ``attack``'s fitted classifier in ``directory`` (``attack.npz``, numbers only,
    and ``attack.json``: what it was fitted on, its digest), where it converted to plain
    arrays (:mod:`fedforget.evaluation.attack_models`); nothing is kept otherwise."""
    from fedforget.evaluation.attack_models import (
        LogisticScorer,
        TreeEnsembleScorer,
        save_scorer,
    )
    from fedforget.fileio import write_atomic
    from fedforget.tensors import sha256_digest

    if not isinstance(attack.classifier, LogisticScorer | TreeEnsembleScorer):
        return
    data = save_scorer(attack.classifier)
    write_atomic(directory / "attack.npz", data)
    write_atomic(directory / "attack.json", json.dumps(
        {"attack_digest": sha256_digest(data), "fitted_on": fitted_on,
         "fitted_on_digest": _fitted_on_digest(fitted_on),
         "num_classes": attack.num_classes, "threshold": attack.threshold},
        indent=2, sort_keys=True))

"""Unlearning-aware rounds for any Flower app: one call in the app's ServerApp.

.. code-block:: python

    from fedforget.flower import Unlearnable

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.5)
        strategy = Unlearnable(strategy, context)           # the one added line
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3,
                                train_config=ConfigRecord({"lr": 0.1}),
                                evaluate_fn=global_evaluate)

:meth:`Unlearnable.start` takes the arguments of Flower's ``Strategy.start`` and, by
``fedforget.mode`` (see :mod:`fedforget.settings`):

* ``train`` — identifies the clients by stable id, creates the run directory's history
  store (``fedforget.out-dir``) or resumes it from its last complete round, records the
  roster and θ₀, samples clients by stable id with a seeded generator, hands every client
  its training seed, aggregates with the app's strategy in client-id order, commits every
  round, signs a tree head after each and sends it to the clients, flushes, and writes the
  app's central evaluation per round to ``metrics.jsonl``. Withdrawn clients are never
  sampled again, from the next round on.
  A client that asks to leave itself (``fedforget client withdraw`` on its node; the
  request comes with its replies) is recorded in the ledger, bound to its node, and never
  selected again from the next round on; after the rounds, the server's policy
  (``fedforget.withdrawal-method``), if set, serves it.
* ``unlearn`` — serves the withdrawal request ``fedforget unlearn`` ordered, with the
  ordered method, through :class:`fedforget.service.UnlearningService`: the app's strategy
  for every replayed round, the app's ClientApp for every client step, the app's
  ``evaluate_fn`` (or the ``measure`` given) for the comparison. The result's model is
  returned as ``Result.arrays``.

In both modes every receipt still waiting for its client is delivered to it as soon as it is
connected (:mod:`fedforget.delivery`).

The app's run config stays the app's: fedforget reads only ``fedforget.*`` keys.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedforget.arrays import TensorDict, from_array_record, to_array_record
from fedforget.delivery import deliver_receipts
from fedforget.engine.polling import fast_polling
from fedforget.erasure import FORGET_LABELS, labels_text
from fedforget.errors import ConfigError, HistoryError
from fedforget.evaluation.on_client import is_deployment_grid
from fedforget.federation import FederationApp, GridFederation, identify_clients
from fedforget.history import HeadLog, HistoryStore
from fedforget.identity import NodePins
from fedforget.lock import run_lock
from fedforget.measure import EvaluateFnMeasure, Measure
from fedforget.protocol import WithdrawalAsk
from fedforget.receipts.issuer import head_log, signing_key
from fedforget.rundir import RunDirectory
from fedforget.service import UnlearningService, read_model
from fedforget.settings import RecordingSettings, RunSettings, app_run_config
from fedforget.strategies.history import aggregation_kind
from fedforget.withdrawal import WithdrawalLedger

log = logging.getLogger("fedforget.server")

__all__ = ["Unlearnable"]

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


def engine_of(grid: Grid, settings: RunSettings) -> str:
    """The engine a ServerApp runs on, as results record it."""
    if settings.engine:
        return settings.engine
    if is_deployment_grid(grid):
        return "deployment"
    return "inprocess" if type(grid).__name__ == "InProcessGrid" else "flower"


class Unlearnable:
    """Make a Flower strategy's run recorded and unlearnable (see the module).

    Parameters
    ----------
    strategy : Strategy
        The app's strategy (FedAvg, FedProx, FedMedian, ...), as the app built it; it is
        copied, never changed.
    context : Context
        The ServerApp's context (its run config gives ``fedforget.*`` settings).
    measure : Measure, optional
        How an unlearning result is compared (default: the app's ``evaluate_fn`` on each
        model, :class:`fedforget.measure.EvaluateFnMeasure`).
    local_epochs_key : str, optional
        The name of the app's local-epochs setting (in the train config or, read by the
        ClientApp, in the run config), so that a method can ask for other epochs
        (FedEraser's calibration); its value also counts cost in client-epochs.
    evaluate_rounds : collection of int, optional
        Rounds with federated evaluation (None, the default: as the app's strategy does).
    min_nodes : int, optional
        Nodes to wait for before identifying the clients (default: the strategy's
        ``min_available_nodes``, or the clients of the history when resuming).
    extendable_keys : collection of str
        App run-config keys that may change when a run is resumed (e.g. the number of
        rounds, to extend a finished run); any other change is refused.
    seed, clients_per_round, min_replies, retain_interval, codec, history_fsync
        :class:`fedforget.settings.RecordingSettings` (default: ``fedforget.*`` run-config
        keys, else the defaults).
    max_update_norm, update_norm_policy, max_examples_factor, num_examples_policy
        Robust aggregation (:mod:`fedforget.robust`): refuse or clip an update whose norm
        exceeds the bound, refuse or cap a reported example count above the factor times
        the size the client reported when it identified itself (0: off).
    """

    def __init__(
        self,
        strategy: Strategy,
        context: Context,
        *,
        measure: Measure | None = None,
        local_epochs_key: str | None = None,
        evaluate_rounds: Collection[int] | None = None,
        min_nodes: int | None = None,
        extendable_keys: Collection[str] = (),
        seed: int | None = None,
        clients_per_round: int | None = None,
        min_replies: int | None = None,
        retain_interval: int | None = None,
        codec: str | None = None,
        history_fsync: bool | None = None,
        max_update_norm: float | None = None,
        update_norm_policy: str | None = None,
        max_examples_factor: float | None = None,
        num_examples_policy: str | None = None,
    ) -> None:
        self.strategy = copy.deepcopy(strategy)
        self.context = context
        self.settings = RunSettings.from_run_config(context.run_config)
        self.recording = RecordingSettings.from_run_config(
            context.run_config, seed=seed, clients_per_round=clients_per_round,
            min_replies=min_replies, retain_interval=retain_interval, codec=codec,
            history_fsync=history_fsync, max_update_norm=max_update_norm,
            update_norm_policy=update_norm_policy, max_examples_factor=max_examples_factor,
            num_examples_policy=num_examples_policy,
        )
        self.app_config = app_run_config(context.run_config)
        self.measure = measure
        self.local_epochs_key = local_epochs_key
        self.evaluate_rounds = None if evaluate_rounds is None else frozenset(evaluate_rounds)
        self.min_nodes = min_nodes
        self.extendable_keys = frozenset(extendable_keys)
        self.run = RunDirectory(self.settings.run_dir)
        self.federation: GridFederation | None = None

    # ---------------------------------------------------------------- start
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Train (or resume) ``num_rounds`` rounds, or serve the ordered withdrawal."""
        grid = fast_polling(grid)  # replies picked up in ms, not on Flower's 0.1 s / 3 s steps
        app = FederationApp(
            strategy=self.strategy,
            train_config={**dict(train_config or {}), **self._erasure_config()},
            local_epochs=self._local_epochs(train_config),
            local_epochs_key=self.local_epochs_key,
        )
        # One writer at a time (re-entrant in this process: fedforget's CLI, running the
        # in-process engine, already holds it)
        with run_lock(self.run.path, command=f"fedforget {self.settings.mode} (ServerApp)"):
            if self.settings.mode == "unlearn":
                return self._unlearn(grid, app, evaluate_fn, timeout)
            return self._train(grid, app, initial_arrays, num_rounds, timeout,
                               evaluate_config, evaluate_fn)

    def _erasure_config(self) -> dict[str, str]:
        """The train-config entry of the labels forgotten across the federation, once a
        class-level request is in force (every round from then on trains without them)."""
        if not self.run.exists():
            return {}
        with WithdrawalLedger(self.run.path) as ledger:
            labels = ledger.scope().labels
        return {FORGET_LABELS: labels_text(labels)} if labels else {}

    def _local_epochs(self, train_config: Mapping[str, Any] | None) -> int:
        key = self.local_epochs_key
        if key is None:
            return 1
        for source in (train_config or {}, self.app_config):
            value = source.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return int(value)
        raise ConfigError(f"local_epochs_key = {key!r}: no such key in the train config or "
                          "the run config")

    def _federation(self, grid: Grid, app: FederationApp, expected: int,
                    timeout: float | None, signer: HeadLog | None = None) -> GridFederation:
        self.asks: list[WithdrawalAsk] = []
        reply_timeout = timeout if timeout is not None else self.settings.reply_timeout
        sizes: dict[str, int] = {}
        clients = identify_clients(grid, expected, asks=self.asks,
                                   extra_config=signer.config() if signer else None,
                                   sizes=sizes,
                                   want_sizes=self.recording.max_examples_factor > 0,
                                   pins=NodePins(self.run.nodes, pin=self.settings.node_auth),
                                   reply_timeout=reply_timeout,
                                   progress=self.settings.progress)
        if not clients:
            raise HistoryError("no client identified itself: is fedforget's client mod "
                               "(fedforget.flower.unlearning_mod) in the ClientApp's mods?")
        self.federation = GridFederation(
            grid, clients, app=app, settings=self.recording,
            reply_timeout=reply_timeout, progress=self.settings.progress, sizes=sizes,
        )
        return self.federation

    # ---------------------------------------------------------------- train
    def _open_store(self) -> HistoryStore:
        fsync = self.recording.history_fsync
        if self.run.exists():
            store = HistoryStore.open(self.run.path, fsync=fsync)
            try:
                self._check_same_training(store)
            except BaseException:
                store.close()
                raise
            return store
        store = HistoryStore.create(self.run.path, run_config=self.app_config,
                                    codec=self.recording.codec,
                                    retain_interval=self.recording.retain_interval,
                                    fsync=fsync)
        # the aggregation lets server-side methods read only what their rule needs
        store.set_recording({**self.recording.to_dict(),
                             "aggregation": aggregation_kind(self.strategy)})
        return store

    def _check_same_training(self, store: HistoryStore) -> None:
        """Refuse to resume ``store`` with settings that would train differently."""
        stored, wanted = store.run_config, self.app_config
        diff = [k for k in sorted(set(stored) | set(wanted))
                if stored.get(k) != wanted.get(k) and k not in self.extendable_keys]
        recorded = store.recording
        schedule = self.recording.schedule()
        diff += [f"fedforget.{k}" for k in schedule
                 if recorded and recorded.get(k) != schedule[k]]
        if diff:
            def shown(key: str) -> str:
                if key.startswith("fedforget."):
                    k = key[len("fedforget."):]
                    return f"{key} = {recorded.get(k)!r} (now {schedule[k]!r})"
                return f"{key} = {stored.get(key)!r} (now {wanted.get(key)!r})"

            raise HistoryError(
                f"run directory {str(store.directory)!r} holds a run with another "
                f"configuration: {', '.join(shown(k) for k in diff)}; use a new out-dir"
            )

    def _train(self, grid: Grid, app: FederationApp, initial_arrays: ArrayRecord,
               num_rounds: int, timeout: float | None,
               evaluate_config: ConfigRecord | None, evaluate_fn: EvaluateFn | None) -> Result:
        store = self._open_store()
        try:
            if num_rounds < store.last_round:
                raise HistoryError(
                    f"{self.run.path} holds {store.last_round} rounds; num_rounds = "
                    f"{num_rounds} would train none and report a model of another length: "
                    f"ask for {store.last_round} or more (to extend the run), or use a new "
                    "out-dir")
            roster = store.roster()
            with WithdrawalLedger(self.run.path) as ledger:
                withdrawn = ledger.withdrawn()
                for request in ledger.interrupted():
                    log.warning(
                        "withdrawal %s of %s was interrupted while unlearning; re-run it with "
                        "`fedforget unlearn %s --client %s --method %s`", request.request_id,
                        request.client_id, self.run.path, request.client_id, request.method,
                    )
            expected = self.min_nodes or (len(set(roster) - withdrawn) if roster else
                                          int(getattr(self.strategy, "min_available_nodes", 1)))
            _, public_key = signing_key(self.run, self._keys_dir())
            signer = head_log(store, self.run, self._keys_dir())
            federation = self._federation(grid, app, expected, timeout, signer)
            store.set_roster(sorted(set(roster) | set(federation.roster)))
            if is_deployment_grid(grid):
                self._mark_deployed()
            if store.last_round == 0 and store.initial_model_digest is None:
                store.put_initial_model(from_array_record(initial_arrays))
            deliver_receipts(self.run, federation, public_key)
            asked = [self._record_ask(ask, store.roster()) for ask in self.asks]
            metrics_path = self.run.metrics

            def central(t: int, model: TensorDict) -> dict[str, float] | None:
                if evaluate_fn is None:
                    return None
                record = evaluate_fn(t, to_array_record(model))
                if record is None:
                    return None
                values = {str(k): float(v) for k, v in record.items()
                          if isinstance(v, int | float) and not isinstance(v, bool)}
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps({"round": t, **values}) + "\n")
                return values

            roster_now = store.roster()
            with WithdrawalLedger(self.run.path) as ledger:
                final = federation.replay(
                    store=store, start_round=store.last_round + 1, end_round=num_rounds,
                    exclude=withdrawn, on_round=central,
                    evaluate_rounds=self.evaluate_rounds, head_signer=signer,
                    evaluate_config=evaluate_config, refresh_exclude=ledger.withdrawn,
                    on_ask=lambda ask: asked.append(self._record_ask(ask, roster_now)),
                )
            signer.sign()  # covers withdrawals asked during the last round
            if federation.last_evaluation:
                self.run.client_evaluation.write_text(
                    json.dumps(federation.last_evaluation, indent=2, sort_keys=True))
            result = getattr(federation, "last_result", None)
            if result is None or store.last_round != num_rounds:
                result = Result(arrays=to_array_record(final))
        finally:
            store.close()
        self._serve_asked([r for r in asked if r], federation, evaluate_fn, public_key)
        return result

    def _mark_deployed(self) -> None:
        """Record that this run's clients are SuperNodes (``deployment.json``): its client
        work can then only be done by them, never re-simulated (``fedforget unlearn``
        refuses another engine for a method that asks the clients)."""
        from fedforget.history.records import utc_now

        path = self.run.deployment
        if not path.exists():
            path.write_text(json.dumps({"engine": "deployment", "since": utc_now(),
                                        "node_auth": self.settings.node_auth}, indent=2))

    def _record_ask(self, ask: WithdrawalAsk, roster: Collection[str]) -> str | None:
        """Record a client's own withdrawal (bound to the node it came from); its id."""
        with WithdrawalLedger(self.run.path) as ledger:
            request, created = ledger.request(ask.client_id, reason=ask.reason or
                                              "asked by the client", roster=set(roster))
        if created:
            directory = self.run.withdrawal_dir(request.request_id)
            directory.mkdir(parents=True, exist_ok=True)
            if ask.head:
                self.run.withdrawal_head(request.request_id).write_text(ask.head)
            self.run.asked(request.request_id).write_text(json.dumps(
                {"client_id": ask.client_id, "node_id": ask.node_id, "asked_at": ask.asked_at,
                 "received_at": request.received_at, "reason": ask.reason}, indent=2))
            log.warning("client %s asked to withdraw (request %s): it is not selected again",
                        ask.client_id, request.request_id)
        return request.request_id if request.state == "pending" else None

    def _serve_asked(self, request_ids: list[str], federation: GridFederation,
                     evaluate_fn: EvaluateFn | None, public_key: Path) -> None:
        """Serve client-asked withdrawals by the server's policy, and deliver receipts."""
        policy = self.settings.withdrawal_policy()
        if policy is None or not request_ids:
            return
        method, params = policy
        service = self._service(federation, evaluate_fn)
        for request_id in dict.fromkeys(request_ids):
            with WithdrawalLedger(self.run.path) as ledger:
                ledger.order(request_id, method=method, params=params)
            service.serve(request_id)
            deliver_receipts(self.run, federation, public_key, only=request_id)

    def _service(self, federation: GridFederation, evaluate_fn: EvaluateFn | None
                 ) -> UnlearningService:
        with HistoryStore.open(self.run.path) as store:
            last_round = store.last_round
        return UnlearningService(
            self.run, federation=federation,
            measure=self.measure or EvaluateFnMeasure(evaluate_fn, final_round=last_round),
            keys_dir=self._keys_dir(), engine=engine_of(federation.grid, self.settings),
            reference=self.settings.reference, impact_clients=self.settings.impact_clients,
        )

    def _keys_dir(self) -> Path:
        return Path(self.settings.keys_dir) if self.settings.keys_dir else self.run.default_keys

    # -------------------------------------------------------------- unlearn
    def _unlearn(self, grid: Grid, app: FederationApp, evaluate_fn: EvaluateFn | None,
                 timeout: float | None) -> Result:
        with HistoryStore.open(self.run.path) as store:
            self._check_same_training(store)
            roster = store.roster()
        with WithdrawalLedger(self.run.path) as ledger:
            withdrawn = ledger.withdrawn()
        expected = self.min_nodes or max(1, len(set(roster) - withdrawn))
        _, public_key = signing_key(self.run, self._keys_dir())
        with HistoryStore.open(self.run.path) as store:
            signer = head_log(store, self.run, self._keys_dir())
        federation = self._federation(grid, app, expected, timeout, signer)
        deliver_receipts(self.run, federation, public_key)
        for ask in self.asks:
            self._record_ask(ask, roster)
        outcome = self._service(federation, evaluate_fn).serve(self.settings.request_id or None)
        deliver_receipts(self.run, federation, public_key, only=outcome.request_id)
        return Result(arrays=to_array_record(read_model(self.run.path / outcome.model_path)))


"""Engines that run a Flower app's ServerApp and ClientApp (fedforget's own or a user's).

* ``inprocess``: :class:`~fedforget.engine.inprocess.InProcessGrid`, synchronous, in this
  process; for tests and large experiment grids.
* ``simulation``: Flower's simulation engine (Ray) through ``flwr run``.
* ``deployment``: a running SuperLink with SuperNodes, through ``flwr run . <connection>``
  (:mod:`fedforget.engine.deployment`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedforget.config import RunConfig
from fedforget.engine.apps import FlowerProject, find_project, find_run_app
from fedforget.errors import ConfigError
from fedforget.settings import DEFAULT_IMPACT_CLIENTS, PREFIX, RunSettings

if TYPE_CHECKING:
    from fedforget.engine.deployment import SuperLinkTarget
    from fedforget.results import UnlearningOutcome

ENGINES = ("inprocess", "simulation", "deployment")


def run_app(
    project: FlowerProject,
    *,
    run_config: Mapping[str, Any],
    num_nodes: int,
    engine: str = "inprocess",
    progress: bool = True,
    connection: SuperLinkTarget | None = None,
) -> None:
    """Run ``project``'s ServerApp with ``run_config`` against ``num_nodes`` ClientApps
    (node ``i`` gets ``partition-id = i``) on ``engine``; ``deployment`` submits it to the
    SuperLink ``connection`` (its SuperNodes are the clients)."""
    if engine == "inprocess":
        from fedforget.engine.inprocess import run_inprocess

        server_app, client_app = project.load()
        run_inprocess(server_app, client_app, num_nodes=num_nodes, run_config=run_config)
    elif engine == "simulation":
        from fedforget.engine.simulation import run_simulation

        run_simulation(declared_run_config(project, run_config), num_nodes=num_nodes,
                       project=project, progress=progress)
    elif engine == "deployment":
        from fedforget.engine.deployment import run_deployment

        if connection is None:
            raise ConfigError("engine = 'deployment' needs a SuperLink connection: a name of "
                              "$FLWR_HOME/config.toml, or an address and its root certificate")
        run_deployment(declared_run_config(project, run_config), connection=connection,
                       project=project, progress=progress)
    else:
        raise ConfigError(f"engine = {engine!r}; expected one of {', '.join(ENGINES)}")


def declared_run_config(project: FlowerProject, run_config: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """``run_config`` restricted to what ``flwr run`` accepts: the keys the app declares.

    ``fedforget.*`` keys the app does not declare are dropped (their defaults apply);
    ``fedforget.out-dir`` and ``fedforget.mode`` must be declared.
    """
    declared = project.run_config_defaults()
    for required in (PREFIX + "out-dir", PREFIX + "mode"):
        if required not in declared:
            raise ConfigError(
                f"the app in {project.root} does not declare {required!r} in "
                "[tool.flwr.app.config] of its pyproject.toml, so `flwr run` cannot be told "
                f"it; add e.g. {required} = \"\""
            )
    return {k: v for k, v in run_config.items() if k in declared or not k.startswith(PREFIX)}


def run_training(
    cfg: RunConfig,
    *,
    out: str | Path,
    engine: str = "inprocess",
    project: FlowerProject | None = None,
    progress: bool = True,
    connection: SuperLinkTarget | None = None,
    **settings: Any,
) -> None:
    """Train (or resume) fedforget's own app on ``cfg`` into the run directory ``out``.

    ``settings`` are further :class:`~fedforget.settings.RunSettings` (e.g. ``mode``);
    ``connection``: the SuperLink of the ``deployment`` engine (``out`` is then a path on
    the SuperLink's machine, where the ServerApp runs).
    """
    from fedforget.lock import run_lock

    run = RunSettings(out_dir=str(Path(out).resolve()), progress=progress, engine=engine,
                      **settings)
    # In this process, the ServerApp's own lock nests in this one; under Flower's engines
    # the ServerApp's process takes it.
    with (run_lock(run.run_dir, command=f"fedforget train ({engine})")
          if engine == "inprocess" else contextlib.nullcontext()):
        run_app(project or find_project(),
                run_config={**cfg.to_mapping(), **run.to_run_config()},
                num_nodes=cfg.num_clients, engine=engine, progress=progress,
                connection=connection)


def run_unlearning(
    run_dir: str | Path,
    *,
    client: str,
    method: str,
    params: Mapping[str, Any] | None = None,
    reason: str = "",
    engine: str = "inprocess",
    app_dir: str | Path | None = None,
    project: FlowerProject | None = None,
    progress: bool = True,
    reference: str = "compute",
    keys_dir: str | Path | None = None,
    records: Collection[str] | None = None,
    labels: Collection[int] | None = None,
    connection: SuperLinkTarget | None = None,
    node_auth: bool = False,
    impact_clients: int = DEFAULT_IMPACT_CLIENTS,
    shadow_attack: str = "auto",
) -> UnlearningOutcome | None:
    """Forget ``client`` from the run in ``run_dir`` with ``method``; return the result.

    With ``records``: forget only those records of ``client`` (it stays); with ``labels``:
    forget those classes on every client, ``client`` naming who asked (see
    :func:`fedforget.service.order_unlearning`).

    ``reference`` (``compute``, ``cached``, ``none``), ``impact_clients`` (remaining
    clients, a seeded sample, asked for the per-client impact; 0: all) and
    ``shadow_attack`` (``auto``: unless ``reference`` is ``none``; ``on``; ``off``) set
    what the measurement costs (:mod:`fedforget.settings`).

    The withdrawal is recorded and ordered (:func:`fedforget.service.order_unlearning`:
    everything that can be refused is refused before anything is written); then the run's
    own app (found by :func:`~fedforget.engine.apps.find_run_app`, or ``project``) runs in
    unlearning mode on ``engine`` and serves it. A method that asks no client for work runs
    without any app when none is found (its figures are then those the server can compute
    alone: distances to a cached reference). Returns None (nothing written) when the
    client never contributed.

    One writer at a time: this process holds the run's lock while it orders the request,
    and while it serves it when the work runs here (in-process, or without an app); under
    Flower's simulation engine the ServerApp's process takes the lock for the serving.

    A run that trained on a deployment is unlearned on the deployment (``engine =
    "deployment"`` and its ``connection``): its clients' work is never simulated here. On
    another engine only a method that asks no client for work is served, without the app.
    """
    from fedforget.history import HistoryStore
    from fedforget.lock import run_lock
    from fedforget.measure import parameter_measure
    from fedforget.results import UnlearningOutcome
    from fedforget.rundir import RESULT_FILE, RunDirectory
    from fedforget.service import UnlearningService, order_unlearning
    from fedforget.unlearning import UnlearningError, get_method

    run = RunDirectory(Path(run_dir).resolve())
    with HistoryStore.open(run.path, read_only=True) as store:
        app_config = dict(store.run_config)
        roster = store.roster()
    if project is None:
        project = find_run_app(app_config, app_dir)
    unlearner = get_method(method, params or {})
    if run.deployed() and engine != "deployment":
        if unlearner.uses_clients():
            raise UnlearningError(
                f"{run.path} was trained on a deployment and {unlearner.name} asks the "
                f"clients for work: unlearn it on the deployment (--engine deployment "
                f"--connection ...), not on engine {engine!r}, which would simulate the "
                "clients here")
        project = None  # server-side only: nothing of the clients is simulated
    if project is None and unlearner.uses_clients():
        raise UnlearningError(
            f"{unlearner.name} asks the clients for work, and the app that recorded "
            f"{run.path} was not found (looked at --app, $FEDFORGET_APP_DIR, the working "
            "directory); give it with --app DIR"
        )
    keys = Path(keys_dir) if keys_dir else run.default_keys
    here = project is None or engine == "inprocess"
    measurement = {"impact_clients": impact_clients, "shadow_attack": shadow_attack}
    with run_lock(run.path, command=f"fedforget unlearn --method {unlearner.name}"):
        request = order_unlearning(run, client=client, method=unlearner.name,
                                   params=unlearner.params.to_dict(), reason=reason,
                                   records=records, labels=labels, keys_dir=keys)
        if request is None:
            return None
        if project is None:
            UnlearningService(run, federation=None, measure=parameter_measure, keys_dir=keys,
                              engine="server", reference=reference).serve(request.request_id)
        elif here:
            _serve_with_app(project, run, request.request_id, app_config, roster, keys,
                            engine=engine, progress=progress, reference=reference,
                            connection=connection, node_auth=node_auth,
                            measurement=measurement)
    if not here:
        assert project is not None
        _serve_with_app(project, run, request.request_id, app_config, roster, keys,
                        engine=engine, progress=progress, reference=reference,
                        connection=connection, node_auth=node_auth, measurement=measurement)
    return UnlearningOutcome.read(run.result_dir(request.request_id, unlearner.name)
                                  / RESULT_FILE)


def _serve_with_app(project: FlowerProject, run: Any, request_id: str,
                    app_config: Mapping[str, Any], roster: tuple[str, ...], keys: Path, *,
                    engine: str, progress: bool, reference: str,
                    connection: SuperLinkTarget | None, node_auth: bool,
                    measurement: Mapping[str, Any] | None = None) -> None:
    """Run the app in unlearning mode for ``request_id``; a failure before its service
    recorded one leaves the request ``failed`` with the reason. ``measurement``: further
    :class:`RunSettings` of what is measured (``impact_clients``, ``shadow_attack``)."""
    settings = RunSettings(out_dir=str(run.path), mode="unlearn", request_id=request_id,
                           progress=progress, reference=reference, engine=engine,
                           keys_dir=str(keys), node_auth=node_auth, **(measurement or {}))
    try:
        run_app(project, run_config={**app_config, **settings.to_run_config()},
                num_nodes=len(roster), engine=engine, progress=progress,
                connection=connection)
    except BaseException as exc:
        _fail_if_unserved(run, request_id, exc, keys)
        raise


def _fail_if_unserved(run: Any, request_id: str, exc: BaseException, keys: Path) -> None:
    """The app failed before (or without) its unlearning service recording the failure:
    move the request to ``failed`` with the reason, so that no request is left pending.
    A request already ``done`` (another method served it before) stays ``done``.
    (A run directory locked by another command is that command's: nothing is moved.)"""
    from fedforget.history import HistoryStore
    from fedforget.lock import RunLockedError
    from fedforget.receipts.issuer import head_log
    from fedforget.withdrawal import WithdrawalLedger

    if isinstance(exc, RunLockedError):
        return
    with HistoryStore.open(run.path) as store, WithdrawalLedger(run.path) as ledger:
        request = ledger.get(request_id)
        if request.state == "done":
            return  # served, now or by an earlier method: its committed result stands
        if request.state == "failed" and request.updated_at >= (request.ordered_at or ""):
            return  # the service recorded its failure
        if request.state in ("pending", "failed"):
            ledger.move(request_id, "unlearning", method=request.method)
        ledger.move(request_id, "failed", method=request.method,
                    detail={"error": f"the app failed: {type(exc).__name__}: {exc}"})
        head_log(store, run, keys)

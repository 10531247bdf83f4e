"""Engines that run a Flower app's ServerApp and ClientApp (fedforget's own or a user's).

* ``inprocess``: :class:`~fedforget.engine.inprocess.InProcessGrid`, synchronous, in this
  process; for tests and large experiment grids.
* ``simulation``: Flower's simulation engine (Ray) through ``flwr run``.

Deployment (SuperLink + SuperNodes) runs the same apps with ``flwr run . <connection>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedforget.config import RunConfig
from fedforget.engine.apps import FlowerProject, find_project, find_run_app
from fedforget.errors import ConfigError
from fedforget.settings import DEFAULT_IMPACT_CLIENTS, PREFIX, RunSettings

if TYPE_CHECKING:
    from fedforget.results import UnlearningOutcome

ENGINES = ("inprocess", "simulation")


def run_app(
    project: FlowerProject,
    *,
    run_config: Mapping[str, Any],
    num_nodes: int,
    engine: str = "inprocess",
    progress: bool = True,
) -> None:
    """Run ``project``'s ServerApp with ``run_config`` against ``num_nodes`` ClientApps
    (node ``i`` gets ``partition-id = i``) on ``engine``."""
    if engine == "inprocess":
        from fedforget.engine.inprocess import run_inprocess

        server_app, client_app = project.load()
        run_inprocess(server_app, client_app, num_nodes=num_nodes, run_config=run_config)
    elif engine == "simulation":
        from fedforget.engine.simulation import run_simulation

        run_simulation(declared_run_config(project, run_config), num_nodes=num_nodes,
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
    **settings: Any,
) -> None:
    """Train (or resume) fedforget's own app on ``cfg`` into the run directory ``out``.

    ``settings`` are further :class:`~fedforget.settings.RunSettings` (e.g. ``mode``).
    """
    run = RunSettings(out_dir=str(Path(out).resolve()), progress=progress, engine=engine,
                      **settings)
    run_app(project or find_project(), run_config={**cfg.to_mapping(), **run.to_run_config()},
            num_nodes=cfg.num_clients, engine=engine, progress=progress)


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
    impact_clients: int = DEFAULT_IMPACT_CLIENTS,
    shadow_attack: str = "auto",
) -> UnlearningOutcome | None:
    """Forget ``client`` from the run in ``run_dir`` with ``method``; return the result.

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
    """
    from fedforget.history import HistoryStore
    from fedforget.measure import parameter_measure
    from fedforget.results import UnlearningOutcome
    from fedforget.rundir import RESULT_FILE, RunDirectory
    from fedforget.service import UnlearningService, order_unlearning
    from fedforget.unlearning import UnlearningError, get_method

    run = RunDirectory(Path(run_dir).resolve())
    with HistoryStore.open(run.path) as store:
        app_config = dict(store.run_config)
        roster = store.roster()
    if project is None:
        project = find_run_app(app_config, app_dir)
    unlearner = get_method(method, params or {})
    if project is None and unlearner.uses_clients():
        raise UnlearningError(
            f"{unlearner.name} asks the clients for work, and the app that recorded "
            f"{run.path} was not found (looked at --app, $FEDFORGET_APP_DIR, the working "
            "directory); give it with --app DIR"
        )
    request = order_unlearning(run, client=client, method=unlearner.name,
                               params=unlearner.params.to_dict(), reason=reason)
    if request is None:
        return None
    keys = Path(keys_dir) if keys_dir else run.default_keys
    if project is None:
        UnlearningService(run, federation=None, measure=parameter_measure, keys_dir=keys,
                          engine="server", reference=reference).serve(request.request_id)
    else:
        settings = RunSettings(out_dir=str(run.path), mode="unlearn",
                               request_id=request.request_id, progress=progress,
                               reference=reference, engine=engine, keys_dir=str(keys),
                               impact_clients=impact_clients, shadow_attack=shadow_attack)
        try:
            run_app(project, run_config={**app_config, **settings.to_run_config()},
                    num_nodes=len(roster), engine=engine, progress=progress)
        except BaseException as exc:
            _fail_if_unserved(run, request.request_id, exc)
            raise
    return UnlearningOutcome.read(run.result_dir(request.request_id, unlearner.name)
                                  / RESULT_FILE)


def _fail_if_unserved(run: Any, request_id: str, exc: BaseException) -> None:
    """The app failed before (or without) its unlearning service recording the failure:
    move the request to ``failed`` with the reason, so that no request is left pending."""
    from fedforget.withdrawal import WithdrawalLedger

    with WithdrawalLedger(run.path) as ledger:
        request = ledger.get(request_id)
        if (request.state in ("done", "failed")
                and request.updated_at >= (request.ordered_at or "")):
            return  # the service served it, or recorded its failure
        if request.state in ("pending", "done", "failed"):
            ledger.move(request_id, "unlearning", method=request.method)
        ledger.move(request_id, "failed", method=request.method,
                    detail={"error": f"the app failed: {type(exc).__name__}: {exc}"})

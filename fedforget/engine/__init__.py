"""Engines that run fedforget's ServerApp and ClientApp.

* ``inprocess``: :class:`~fedforget.engine.inprocess.InProcessGrid`, synchronous, in this
  process; for tests and large experiment grids.
* ``simulation``: Flower's simulation engine (Ray) through ``flwr run``.

Deployment (SuperLink + SuperNodes) runs the same apps with ``flwr run . <connection>``.
"""

from __future__ import annotations

from fedforget.config import RunConfig
from fedforget.engine.apps import FlowerProject, find_project
from fedforget.errors import ConfigError

ENGINES = ("inprocess", "simulation")


def run_training(
    cfg: RunConfig, *, engine: str = "inprocess", project: FlowerProject | None = None
) -> None:
    """Run the ServerApp on ``cfg`` (train or resume; or unlearn when ``cfg.mode`` says)."""
    project = project or find_project()
    if engine == "inprocess":
        from fedforget.engine.inprocess import run_inprocess

        server_app, client_app = project.load()
        run_inprocess(
            server_app, client_app, num_nodes=cfg.num_clients, run_config=cfg.to_mapping()
        )
    elif engine == "simulation":
        from fedforget.engine.simulation import run_simulation

        run_simulation(cfg, project=project)
    else:
        raise ConfigError(f"engine = {engine!r}; expected one of {', '.join(ENGINES)}")

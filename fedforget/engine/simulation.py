"""Run the app under Flower's simulation engine (Ray), the way Flower users do.

``flwr run`` needs a SuperLink in simulation mode. Flower's managed local SuperLink is
started detached and left running, with fixed ports; instead this module starts its own
``flower-superlink --simulation`` on free loopback ports with a private ``FLWR_HOME``,
submits the run with ``flwr run <app> <connection> --run-config <file> --stream`` (``<app>``:
the project's files staged by :func:`~fedforget.engine.apps.stage_app`, the same FAB without
Flower walking a virtual environment inside the project),
waits for it, and stops the SuperLink it started (by its process group, which it owns).

A :func:`simulation_session` keeps one SuperLink (and, optionally, one Ray cluster: a
``ray start --head --block`` whose address every simulation's ``ray.init`` connects to) for
every run submitted inside it, so that an experiment of many runs pays their start-up once;
outside a session every run starts and stops its own SuperLink. Ray's dashboard is never
started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedforget.engine.apps import FlowerProject, find_project, stage_app
from fedforget.engine.processes import ADDRESS_IN_USE, BIND_ATTEMPTS, free_port
from fedforget.errors import FedForgetError

CONNECTION = "fedforget-sim"


class SimulationError(FedForgetError):
    """Flower's simulation engine failed or did not finish the run."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_run_config(values: Mapping[str, Any], path: Path) -> Path:
    """Write a flat run-config TOML file for ``flwr run --run-config``."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def simulation_env(flwr_home: Path) -> dict[str, str]:
    """Environment for quiet, local, offline Flower processes."""
    env = dict(os.environ)
    # The SuperLink starts `flower-superexec` and friends by name: use this venv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("FLWR_LOG_LEVEL", "WARNING")
    return env


@contextlib.contextmanager
def local_superlink(flwr_home: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Start a SuperLink in simulation mode; yield the connection name; stop it.

    ``env`` is the SuperLink's environment (default :func:`simulation_env`); the
    simulations it starts inherit it (a ``RAY_ADDRESS`` there makes them use that cluster).
    """
    proc = _started_superlink(flwr_home, env)
    try:
        yield CONNECTION
    finally:
        _stop_group(proc)




def _started_superlink(flwr_home: Path, env: Mapping[str, str] | None
                       ) -> subprocess.Popen[bytes]:
    """A SuperLink listening on four fresh ports; started again (at most
    :data:`BIND_ATTEMPTS` times) when another process took a port between its choice and
    the SuperLink's bind."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while True:
        proc, log_path, http_port = _start_superlink(flwr_home, env)
        try:
            _wait_for_port(http_port, proc, log_path)
            return proc
        except SimulationError as exc:
            _stop_group(proc)
            if ADDRESS_IN_USE not in str(exc) or attempt >= BIND_ATTEMPTS:
                raise
        (flwr_home / "state.db").unlink(missing_ok=True)
        attempt += 1


def _start_superlink(flwr_home: Path, env: Mapping[str, str] | None
                     ) -> tuple[subprocess.Popen[bytes], Path, int]:
    """Start ``flower-superlink`` on four ports free now; its process, log and HTTP port."""
    http_port, control_port, fleet_port, health_port = (free_port() for _ in range(4))
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{http_port}"\n'
        "insecure = true\n"
    )
    log_path = flwr_home / "superlink.log"
    command = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(http_port),
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        "--health-server-address", f"127.0.0.1:{health_port}",
        "--database", str(flwr_home / "state.db"),
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            env=dict(env) if env is not None else simulation_env(flwr_home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return proc, log_path, http_port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log_path: Path,
                   what: str = "flower-superlink") -> None:
    deadline = time.monotonic() + 60
    pause = 0.01
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(
                f"{what} exited with code {proc.returncode}; see {log_path}:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(pause)
        pause = min(0.2, pause * 1.5)
    raise SimulationError(f"{what} did not listen on port {port} within 60 s")


def _descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (read from /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink this module started and every process it started.

    Flower starts SuperExec and the simulation detached (new sessions), so the process
    group is not enough: the descendants are listed by PID before the SuperLink stops,
    and those still alive afterwards are ended by their PIDs.
    """
    family = _descendants(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.2)
        deadline = time.monotonic() + 5


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def local_ray(directory: Path | None = None, *, num_cpus: int | None = None
              ) -> Iterator[str]:
    """Start a Ray head node on loopback (``ray start --head --block``, no dashboard, no
    usage stats); yield its address; stop it and every process it started, by PID.

    Ray's files go to ``directory``, or (default, and when that path is too long for the
    Unix sockets Ray puts under it: 107 bytes in all) a new short directory under /tmp,
    removed afterwards.
    """
    own = directory is None or len(str(directory)) > 40
    if own:
        base = "/tmp" if os.path.isdir("/tmp") else None
        directory = Path(tempfile.mkdtemp(prefix="ffray-", dir=base))
    assert directory is not None
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _ray_head(directory, num_cpus) as address:
            yield address
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _ray_head(directory: Path, num_cpus: int | None) -> Iterator[str]:
    port = free_port()
    command = [
        _bin("ray"), "start", "--head", "--block", "--port", str(port),
        "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
        "--disable-usage-stats", "--temp-dir", str(directory),
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    log_path = directory / "ray-head.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, env=simulation_env(directory), stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc, log_path, what="ray start --head")
        raylet = directory / "session_latest" / "sockets" / "raylet"
        deadline = time.monotonic() + 60
        while not raylet.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SimulationError(f"the Ray head did not start its raylet; see {log_path}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_group(proc)


@dataclass
class SimulationSession:
    """One SuperLink (and possibly one Ray cluster) that several runs are submitted to."""

    home: Path
    connection: str
    env: dict[str, str]
    ray_address: str | None
    runs: int = 0


_active: SimulationSession | None = None


@contextlib.contextmanager
def simulation_session(*, ray: bool = True, num_cpus: int | None = None
                       ) -> Iterator[SimulationSession]:
    """Keep one SuperLink in simulation mode, and with ``ray`` one Ray cluster, for every
    :func:`run_simulation` inside the block (see the module)."""
    global _active
    with tempfile.TemporaryDirectory(prefix="fedforget-flwr-") as tmp:
        home = Path(tmp)
        cluster = local_ray(num_cpus=num_cpus) if ray else contextlib.nullcontext()
        with cluster as address:
            env = simulation_env(home)
            if address:
                env["RAY_ADDRESS"] = str(address)
            with local_superlink(home, env=env) as connection:
                session = SimulationSession(home=home, connection=connection, env=env,
                                            ray_address=address)
                previous, _active = _active, session
                try:
                    yield session
                finally:
                    _active = previous


def active_session() -> SimulationSession | None:
    """The innermost :func:`simulation_session` open in this process, if any."""
    return _active


def run_simulation(
    run_config: Mapping[str, Any],
    *,
    num_nodes: int,
    project: FlowerProject | None = None,
    num_cpus_per_client: int = 1,
    timeout: float = 1800.0,
    progress: bool = True,
    session: SimulationSession | None = None,
) -> None:
    """Run ``project``'s app with ``run_config`` on Flower's simulation engine with
    ``num_nodes`` SuperNodes (``flwr run``); raise if it fails.

    The run goes to ``session``, else to the active :func:`simulation_session`, else to a
    SuperLink started (and stopped) for it alone.
    """
    session = session or _active
    if session is None:
        with simulation_session(ray=False) as own:
            _submit(own, run_config, num_nodes=num_nodes, project=project,
                    num_cpus_per_client=num_cpus_per_client, timeout=timeout,
                    progress=progress)
        return
    _submit(session, run_config, num_nodes=num_nodes, project=project,
            num_cpus_per_client=num_cpus_per_client, timeout=timeout, progress=progress)


def _submit(session: SimulationSession, run_config: Mapping[str, Any], *, num_nodes: int,
            project: FlowerProject | None, num_cpus_per_client: int, timeout: float,
            progress: bool) -> None:
    project = project or find_project()
    session.runs += 1
    config_file = write_run_config(run_config, session.home / f"run_config-{session.runs}.toml")
    federation = (
        f"num-supernodes={num_nodes} client-resources-num-cpus={num_cpus_per_client:g} "
        "client-resources-num-gpus=0"
    )
    app = stage_app(project.root, session.home / f"app-{session.runs}")
    command = [
        _bin("flwr"), "run", str(app), session.connection,
        "--run-config", str(config_file), "--federation-config", federation, "--stream",
    ]
    try:
        result = subprocess.run(
            command, env=session.env, timeout=timeout,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise SimulationError(f"flwr run did not finish within {timeout:.0f} s") from exc
    finally:
        shutil.rmtree(app, ignore_errors=True)
    output = result.stdout or ""
    if progress:
        sys.stderr.write(output)
    if result.returncode != 0:
        raise SimulationError(f"flwr run exited with {result.returncode}:\n{output[-4000:]}")

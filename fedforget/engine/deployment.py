"""The deployment engine: a fedforget run on a SuperLink with SuperNodes.

Two parts:

* :func:`run_deployment` submits a run of a Flower project to a **running** SuperLink —
  ``flwr run <project> <connection> --run-config <file> --format json`` — follows its log
  (``flwr log <run-id> <connection> --stream``), then reads its final status
  (``flwr ls <connection> --run-id <run-id> --format json``) and raises
  :class:`DeploymentError` unless it is ``finished:completed``. The connection is a name in
  ``$FLWR_HOME/config.toml``, or an address with its TLS root certificate (a private
  ``FLWR_HOME`` with that one connection is then written for the call).
* :class:`LocalDeployment` starts a whole federation on loopback for tests and benchmarks:
  a CA and a SuperLink certificate (:mod:`fedforget.engine.credentials`), one EC P-384 key
  pair per SuperNode, ``flower-superlink`` with TLS and SuperNode authentication, every
  node key registered (``flwr supernode register``), and N SuperNodes, each with its own
  ``FLWR_HOME``, Runtime API port, node config (``partition-id``, ``num-partitions``,
  ``state-dir``) and — with ``warm=True``, the default — ``--isolation process`` and a
  warm ClientApp process (:mod:`fedforget.engine.warm_clientapp`). Every process it
  started is stopped by its PID (with the descendants it listed), never by name.

What a SuperNode machine needs: Python with torch, Flower and fedforget installed (the FAB
carries the project's files, not its dependencies; the SuperLink runs with
``--disable-runtime-dependency-installation``), its private key, the CA certificate, and
its node config. the README's Deploy section gives the commands; the test
``tests/test_deployment.py`` runs them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedforget.engine.apps import FlowerProject, find_project, stage_app
from fedforget.engine.credentials import NodeKey, TlsFiles
from fedforget.engine.processes import (
    ADDRESS_IN_USE,
    BIND_ATTEMPTS,
    alive,
    descendants,
    flower_bin,
    flower_env,
    free_port,
    stop_tree,
)
from fedforget.engine.simulation import write_run_config
from fedforget.errors import ConfigError, FedForgetError

__all__ = ["CONNECTION", "DeploymentError", "LocalDeployment", "LocalNode", "SuperLinkTarget",
           "register_command", "register_node", "run_deployment", "write_connection"]

CONNECTION = "fedforget-local"
# A SuperNode the SuperLink does not activate (its key is not registered, or its node is
# still online from a previous process) logs Flower's exit code 305
# (ExitCode.SUPERNODE_CONNECTION_ERROR, "[code: 2004] Failed to activate SuperNode") and
# ends with process status 1 (a POSIX status cannot be 305).
NODE_REFUSED_LOG = "Exit Code: 305"
PRELOAD = ("torch", "flwr_datasets.partitioner")
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class DeploymentError(FedForgetError):
    """A SuperLink, SuperNode or deployed run failed, or did not finish in time."""


# ------------------------------------------------------------------ connections
def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_connection(flwr_home: str | os.PathLike[str], name: str, *, address: str,
                     root_certificates: str | os.PathLike[str] | None) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with the one SuperLink connection ``name``.

    ``root_certificates`` is the CA file that signed the SuperLink's certificate; None
    writes ``insecure = true`` (plain HTTP: no TLS, and no SuperNode authentication).
    The file is replaced, so use a private ``FLWR_HOME``.
    """
    if not _CONNECTION_NAME.match(name):
        raise ConfigError(f"connection name {name!r}: expected letters, digits, '-' or '_'")
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {_toml_string(name)}", "", f"[superlink.{name}]",
             f"address = {_toml_string(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_string(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class SuperLinkTarget:
    """Where :func:`run_deployment` submits: a connection of a ``FLWR_HOME``.

    Build it with :meth:`from_cli`: a name (``[superlink.NAME]`` of the user's
    ``$FLWR_HOME/config.toml``) or an address ``host:port`` with its TLS root certificate.
    """

    connection: str
    flwr_home: Path | None = None  # None: the environment's (FLWR_HOME, else ~/.flwr)
    address: str | None = None
    root_certificates: Path | None = None

    @classmethod
    def from_cli(cls, connection: str, root_certificates: str | None = None
                 ) -> SuperLinkTarget:
        """``--connection NAME|HOST:PORT`` and ``--root-certificates PEM``."""
        if not connection:
            raise ConfigError("--connection is empty: expected a connection name of "
                              "$FLWR_HOME/config.toml or a SuperLink address host:port")
        if ":" not in connection:
            if root_certificates is not None:
                raise ConfigError(
                    f"--root-certificates with the connection name {connection!r}: a named "
                    "connection takes root-certificates from $FLWR_HOME/config.toml; give "
                    "an address host:port to use this certificate")
            if not _CONNECTION_NAME.match(connection):
                raise ConfigError(f"--connection {connection!r}: expected a connection name "
                                  "(letters, digits, '-', '_') or an address host:port")
            return cls(connection=connection)
        host, _, port = connection.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--connection {connection!r}: expected host:port, e.g. "
                              "127.0.0.1:9093")
        if root_certificates is None:
            raise ConfigError(
                f"--connection {connection!r} without --root-certificates: a SuperLink is "
                "reached over TLS; give the PEM file of the CA that signed its certificate")
        pem = Path(root_certificates)
        if not pem.is_file():
            raise ConfigError(f"--root-certificates {root_certificates!r}: no such file")
        return cls(connection="fedforget", address=connection, root_certificates=pem.resolve())


def register_node(public_key: str | os.PathLike[str], *, connection: str,
                  flwr_home: str | os.PathLike[str], timeout: float = 60.0) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node id.

    Runs ``flwr supernode register <public_key> <connection> --format json``.
    """
    command = register_command(public_key, connection)
    done = subprocess.run(command, env=flower_env(Path(flwr_home)), capture_output=True,
                          text=True, timeout=timeout, check=False)
    payload = _last_json(done.stdout)
    if done.returncode != 0 or not payload or not payload.get("success"):
        raise DeploymentError(
            f"`{shlex.join(command)}` failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-2000:]}")
    return int(payload["node-id"])


def register_command(public_key: str | os.PathLike[str], connection: str) -> list[str]:
    """``flwr supernode register <public_key> <connection> --format json``."""
    return [flower_bin("flwr"), "supernode", "register", str(public_key), connection,
            "--format", "json"]


def _last_json(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object (Flower prints one with --format)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    try:  # a pretty-printed object
        value = json.loads(text[text.index("{"):])
    except (ValueError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------ submitting a run
@dataclass(frozen=True)
class DeployedRun:
    """A finished run on a SuperLink: its id, its final status, its streamed log."""

    run_id: int
    status: str
    log: str
    seconds: float


def run_deployment(
    run_config: Mapping[str, Any],
    *,
    connection: SuperLinkTarget | str,
    project: FlowerProject | None = None,
    timeout: float = 3600.0,
    progress: bool = True,
) -> DeployedRun:
    """Run ``project``'s app with ``run_config`` on a running SuperLink; raise if it fails.

    Parameters
    ----------
    run_config : mapping
        The flat run config (only keys the app declares; see
        :func:`fedforget.engine.declared_run_config`).
    connection : SuperLinkTarget or str
        Where to submit (a ``str`` is a connection name of the environment's
        ``FLWR_HOME``).
    project : FlowerProject, optional
        The Flower project whose FAB is submitted (default: found).
    timeout : float
        Seconds to wait for the run to finish; then it is stopped (``flwr stop``) and
        :class:`DeploymentError` is raised.
    progress : bool
        Echo the run's log to stderr as it comes.

    Returns
    -------
    DeployedRun
        The run id, its final status (``finished:completed``), its log.
    """
    target = connection if isinstance(connection, SuperLinkTarget) else SuperLinkTarget(
        connection=connection)
    project = project or find_project()
    with tempfile.TemporaryDirectory(prefix="fedforget-deploy-") as tmp:
        home = target.flwr_home
        if target.address is not None:
            home = Path(tmp) / "flwr-home"
            write_connection(home, target.connection, address=target.address,
                             root_certificates=target.root_certificates)
        env = flower_env(home) if home is not None else _user_env()
        config_file = write_run_config(run_config, Path(tmp) / "run_config.toml")
        app = stage_app(project.root, Path(tmp) / "app")  # the same FAB, built faster
        return _submit_and_wait(app, target.connection, config_file, env,
                                timeout=timeout, progress=progress)


def _user_env() -> dict[str, str]:
    """The environment with the user's own ``FLWR_HOME`` (quiet and offline)."""
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return flower_env(Path(home))


def _submit_and_wait(root: Path, connection: str, config_file: Path, env: dict[str, str],
                     *, timeout: float, progress: bool) -> DeployedRun:
    flwr = flower_bin("flwr")
    started = time.monotonic()
    submit = [flwr, "run", str(root), connection, "--run-config", str(config_file),
              "--format", "json"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, check=False,
                          timeout=min(timeout, 600.0))
    payload = _last_json(done.stdout)
    if done.returncode != 0 or not payload or not payload.get("run-id"):
        raise DeploymentError(f"`{shlex.join(submit)}` failed (exit {done.returncode}): "
                              f"{(done.stdout + done.stderr).strip()[-3000:]}")
    run_id = int(payload["run-id"])
    follow = [flwr, "log", str(run_id), connection, "--stream"]
    left = timeout - (time.monotonic() - started)
    with subprocess.Popen(follow, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + max(left, 1.0)
        try:
            for line in _lines_until(proc, deadline):
                lines.append(line)
                if progress:
                    sys.stderr.write(line)
        finally:
            if proc.poll() is None:
                stop_tree(proc, grace=5)  # type: ignore[arg-type]
    log_text = "".join(lines)
    status, details = _run_status(flwr, connection, run_id, env)
    if time.monotonic() > deadline and not status.startswith("finished"):
        subprocess.run([flwr, "stop", str(run_id), connection], env=env, capture_output=True,
                       check=False, timeout=120)
        raise DeploymentError(f"run {run_id} did not finish within {timeout:g} s (status "
                              f"{status}); it was stopped. Log:\n{log_text[-3000:]}")
    if status != "finished:completed":
        raise DeploymentError(f"run {run_id} ended {status}"
                              + (f" ({details})" if details else "")
                              + f"; its log:\n{log_text[-4000:]}")
    return DeployedRun(run_id=run_id, status=status, log=log_text,
                       seconds=time.monotonic() - started)


def _lines_until(proc: subprocess.Popen[str], deadline: float) -> Any:
    """Yield ``proc``'s output lines until it ends or ``deadline`` passes."""
    import selectors

    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not selector.select(timeout=min(1.0, max(deadline - time.monotonic(), 0.01))):
            if proc.poll() is not None:
                return
            continue
        line = proc.stdout.readline()
        if not line:
            return
        yield line


def _run_status(flwr: str, connection: str, run_id: int, env: dict[str, str]
                ) -> tuple[str, str]:
    """(status, details) of ``run_id`` from ``flwr ls --run-id --format json``."""
    command = [flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"]
    for _ in range(60):  # the status turns "finished" shortly after the log ends
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                              timeout=120)
        payload = _last_json(done.stdout) or {}
        runs = payload.get("runs") or []
        if runs:
            status = str(runs[0].get("status", "?"))
            if status.startswith("finished"):
                return status, str(runs[0].get("status-details", "") or "")
        elif done.returncode != 0:
            raise DeploymentError(f"`{shlex.join(command)}` failed (exit {done.returncode}): "
                                  f"{(done.stdout + done.stderr).strip()[-2000:]}")
        time.sleep(0.5)
    return status if runs else "unknown", ""


# ------------------------------------------------------------------ a local federation
def node_config_string(values: Mapping[str, Any]) -> str:
    """A ``--node-config`` value: ``key=value`` pairs, strings double-quoted (TOML)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if '"' in str(value):
                raise ConfigError(f"node config {key} = {value!r}: a double quote cannot be "
                                  "passed through --node-config")
            text = f'"{value}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass
class LocalNode:
    """One SuperNode of a :class:`LocalDeployment` (and its warm ClientApp process)."""

    name: str
    key: NodeKey
    node_config: dict[str, Any]
    home: Path
    port: int
    node_id: int | None = None  # from the registration (None: not registered)
    supernode: subprocess.Popen[bytes] | None = None
    clientapp: subprocess.Popen[bytes] | None = None
    family: list[int] = field(default_factory=list)
    log_offset: int = 0  # where this start's lines begin in the log

    @property
    def log_path(self) -> Path:
        """The SuperNode's log (stdout and stderr)."""
        return self.home / "supernode.log"

    @property
    def state_dir(self) -> Path:
        """The node's own state directory (node config ``state-dir``)."""
        return Path(self.node_config["state-dir"])

    def exit_code(self) -> int | None:
        """The SuperNode's exit code, None while it runs."""
        return None if self.supernode is None else self.supernode.poll()


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, with TLS and SuperNode authentication.

    Use as a context manager::

        with LocalDeployment(tmp, num_nodes=3) as federation:
            federation.run(run_config)              # = run_deployment(..., connection=...)

    Parameters
    ----------
    directory : path
        Everything goes below it: ``tls/`` (CA, SuperLink pair), ``keys/`` (node keys),
        ``superlink/`` (its ``FLWR_HOME``, with the ``config.toml`` connection
        ``fedforget-local``, its database and log), ``nodes/<name>/`` (each node's
        ``FLWR_HOME``, log and ``state/`` directory).
    num_nodes : int
        SuperNodes to start; node ``i`` gets ``partition-id = i``,
        ``num-partitions = num_nodes`` and ``state-dir = nodes/node-i/state``.
    warm : bool
        ``--isolation process`` with a warm ClientApp process per node (default); False:
        Flower's default ``--isolation subprocess`` (a new ``flwr-clientapp`` per message).
    poll_interval : float or None
        The SuperNode's shortest idle poll (:mod:`fedforget.engine.supernode`; it grows to
        ``max_poll_interval`` while idle); None runs ``flower-supernode`` itself (it polls
        every 3 s).
    max_poll_interval : float
        The longest idle poll of the SuperNodes and of the warm ClientApps (default 0.25 s;
        shorter: a round starts sooner after the last, for more requests while idle).
    startup_timeout : float
        Seconds to wait for the SuperLink to listen and for each node to connect.
    database : bool
        Keep the SuperLink's state in ``superlink/state.db`` (runs and registered nodes
        survive a restart; default), else in memory.
    preload : tuple of str
        Modules the warm ClientApp processes import at start (default: what fedforget's
        ClientApp imports slowly, torch and flwr-datasets' partitioners, ~10 s here), so
        that the first message does not pay for them.
    """

    def __init__(self, directory: str | os.PathLike[str], *, num_nodes: int, warm: bool = True,
                 poll_interval: float | None = 0.02, max_poll_interval: float = 0.25,
                 startup_timeout: float = 120.0,
                 preload: tuple[str, ...] = PRELOAD, database: bool = True) -> None:
        if num_nodes < 0:
            raise ConfigError(f"num_nodes = {num_nodes}: expected 0 or more")
        self.directory = Path(directory).resolve()
        self.num_nodes = num_nodes
        self.warm = warm
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.startup_timeout = startup_timeout
        self.preload = preload
        self.database = database
        self.connection = CONNECTION
        self.home = self.directory / "superlink"
        self.nodes: list[LocalNode] = []
        self.tls: TlsFiles | None = None
        self.address = ""
        self._superlink: subprocess.Popen[bytes] | None = None
        self._superlink_family: list[int] = []
        self.phases: dict[str, float] = {}
        self.commands: list[list[str]] = []
        """Every command line this deployment ran, in order (the README's Deploy section
        shows them)."""

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Make the credentials, start the SuperLink, register and start the nodes.

        The seconds each phase took are kept in :attr:`phases`.
        """
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.phases[name] = now - clock
            clock = now

        tls_dir = self.directory / "tls"
        self._run_module("fedforget.engine.credentials",
                         ["tls", str(tls_dir), "--host", "127.0.0.1", "--host", "localhost"])
        self.tls = TlsFiles(ca_cert=tls_dir / "ca.pem", server_cert=tls_dir / "superlink.pem",
                            server_key=tls_dir / "superlink.key")
        phase("CA and SuperLink certificate made")
        self._start_superlink()
        phase("SuperLink listening")
        for i in range(self.num_nodes):
            self.add_node({"partition-id": i, "num-partitions": self.num_nodes},
                          name=f"node-{i}", wait=False)
        phase("node keys made and registered, SuperNodes started")
        for node in self.nodes:
            self.wait_connected(node)
        phase("every SuperNode connected")

    def stop(self) -> None:
        """Stop every node, then the SuperLink (and everything each started), by PID."""
        started = time.perf_counter()
        for node in self.nodes:
            self.stop_node(node)
        if self._superlink is not None:
            stop_tree(self._superlink, family=self._superlink_family
                      + descendants(self._superlink.pid))
            self._superlink = None
        self.phases["every process stopped by PID"] = time.perf_counter() - started

    def _run_module(self, module: str, argv: list[str]) -> None:
        """Run ``python -m module argv`` here, through the module's ``main`` (no new
        interpreter), and record the command line."""
        import contextlib
        import importlib
        import io

        self.commands.append([sys.executable, "-m", module, *argv])
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(module).main(argv)

    def env(self) -> dict[str, str]:
        """The environment of a ``flwr`` command against this SuperLink."""
        return flower_env(self.home)

    @property
    def superlink_pid(self) -> int | None:
        """PID of the running ``flower-superlink`` process (None when it is not running)."""
        return self._superlink.pid if self._superlink is not None else None

    @property
    def target(self) -> SuperLinkTarget:
        """This SuperLink's connection, for :func:`run_deployment`."""
        return SuperLinkTarget(connection=self.connection, flwr_home=self.home)

    def run(self, run_config: Mapping[str, Any], *, project: FlowerProject | None = None,
            timeout: float = 1800.0, progress: bool = False) -> DeployedRun:
        """Submit a run to this SuperLink and wait for it (:func:`run_deployment`)."""
        self._superlink_family = sorted(set(self._superlink_family) | set(
            descendants(self._superlink.pid) if self._superlink else []))
        try:
            return run_deployment(run_config, connection=self.target, project=project,
                                  timeout=timeout, progress=progress)
        finally:
            if self._superlink is not None:  # the run's ServerApp process, if still there
                self._superlink_family = sorted(set(self._superlink_family)
                                                | set(descendants(self._superlink.pid)))

    # ---------------------------------------------------------------- the SuperLink
    def superlink_command(self, port: int, control_port: int, fleet_port: int) -> list[str]:
        """The ``flower-superlink`` command line (TLS, SuperNode authentication)."""
        assert self.tls is not None
        return [
            flower_bin("flower-superlink"),
            *self.tls.superlink_args(),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            *(["--database", str(self.home / "state.db")] if self.database else []),
            "--host", "127.0.0.1", "--port", str(port),
            # deprecated legacy gRPC listeners, still opened: keep them off shared ports
            "--control-api-address", f"127.0.0.1:{control_port}",
            "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        ]

    def _start_superlink(self) -> None:
        """Start the SuperLink on fresh ports; again on other ports (at most
        :data:`BIND_ATTEMPTS` starts) when another process took one of them between their
        choice and the SuperLink's bind."""
        assert self.tls is not None
        self.home.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, BIND_ATTEMPTS + 1):
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            command = self.superlink_command(port, free_port(), free_port())
            write_connection(self.home, self.connection, address=self.address,
                             root_certificates=self.tls.ca_cert)
            (self.home / "command.txt").write_text(shlex.join(command) + "\n")
            with (self.home / "superlink.log").open("wb") as log_file:
                self.commands.append(command)
                self._superlink = subprocess.Popen(command, env=self.env(), stdout=log_file,
                                                   stderr=subprocess.STDOUT)
            try:
                self._wait_listening(port)
                return
            except DeploymentError as exc:
                stop_tree(self._superlink, family=descendants(self._superlink.pid))
                self._superlink = None
                if ADDRESS_IN_USE not in str(exc) or attempt == BIND_ATTEMPTS:
                    raise
                (self.home / "state.db").unlink(missing_ok=True)

    def _wait_listening(self, port: int) -> None:
        import socket

        assert self._superlink is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._superlink.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited with code {self._superlink.returncode}:\n"
                    + (self.home / "superlink.log").read_text(errors="replace")[-3000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise DeploymentError(f"flower-superlink did not listen on {port} within "
                              f"{self.startup_timeout:g} s")

    # ---------------------------------------------------------------- SuperNodes
    def add_node(self, node_config: Mapping[str, Any], *, name: str | None = None,
                 register: bool = True, key: NodeKey | None = None, wait: bool = True,
                 ) -> LocalNode:
        """Make a key (unless given), register it (unless ``register=False``) and start a
        SuperNode with ``node_config`` (plus its ``state-dir``); wait until it connected
        (``wait``). Nodes added here are stopped with the deployment."""
        name = name or f"node-{len(self.nodes)}"
        if name in {n.name for n in self.nodes}:
            raise ConfigError(f"node name {name!r} is taken; expected a new name")
        home = self.directory / "nodes" / name
        home.mkdir(parents=True, exist_ok=True)
        if key is None:
            keys = self.directory / "keys"
            self._run_module("fedforget.engine.credentials", ["node-key", str(keys), name])
            key = NodeKey(private_key=keys / name, public_key=keys / f"{name}.pub")
        config = {**node_config, "state-dir": str(home / "state")}
        node = LocalNode(name=name, key=key, node_config=config, home=home, port=free_port())
        if register:
            self.commands.append(register_command(key.public_key, self.connection))
            node.node_id = register_node(key.public_key, connection=self.connection,
                                         flwr_home=self.home)
        self.nodes.append(node)
        self.start_node(node)
        if wait:
            self.wait_connected(node)
        return node

    def supernode_command(self, node: LocalNode) -> list[str]:
        """The SuperNode's command line."""
        assert self.tls is not None
        flags = [
            "--superlink", self.address,
            "--root-certificates", str(self.tls.ca_cert),
            "--auth-supernode-private-key", str(node.key.private_key),
            "--isolation", "process" if self.warm else "subprocess",
            "--host", "127.0.0.1", "--port", str(node.port),
            "--node-config", node_config_string(node.node_config),
        ]
        if self.poll_interval is None:
            return [flower_bin("flower-supernode"), *flags]
        return [sys.executable, "-m", "fedforget.engine.supernode",
                "--poll-interval", f"{self.poll_interval:g}", *self._max_poll(), *flags]

    def _max_poll(self) -> list[str]:
        """``--max-poll-interval S``, unless S is the default of both commands."""
        from fedforget.engine.supernode import DEFAULT_MAX_POLL_INTERVAL

        if self.max_poll_interval == DEFAULT_MAX_POLL_INTERVAL:
            return []
        return ["--max-poll-interval", f"{self.max_poll_interval:g}"]

    def clientapp_command(self, node: LocalNode) -> list[str]:
        """The warm ClientApp process's command line (``warm=True``)."""
        assert node.supernode is not None
        return [sys.executable, "-m", "fedforget.engine.warm_clientapp",
                "--runtime-api-address", f"127.0.0.1:{node.port}",
                "--parent-pid", str(node.supernode.pid), "--log-level", "INFO",
                *self._max_poll(),
                *(["--preload", ",".join(self.preload)] if self.preload else [])]

    def start_node(self, node: LocalNode) -> None:
        """Start ``node``'s SuperNode (and its warm ClientApp process)."""
        Path(node.node_config["state-dir"]).mkdir(parents=True, exist_ok=True)
        # INFO: the SuperNode logs "SuperNode ID: ..." once the SuperLink accepted it
        env = flower_env(node.home, FLWR_LOG_LEVEL="INFO")
        command = self.supernode_command(node)
        (node.home / "command.txt").write_text(shlex.join(command) + "\n")
        node.log_offset = node.log_path.stat().st_size if node.log_path.exists() else 0
        with node.log_path.open("ab") as log_file:
            self.commands.append(command)
            node.supernode = subprocess.Popen(command, env=env, stdout=log_file,
                                              stderr=subprocess.STDOUT)
            if self.warm:
                worker = self.clientapp_command(node)
                (node.home / "clientapp-command.txt").write_text(shlex.join(worker) + "\n")
                self.commands.append(worker)
                node.clientapp = subprocess.Popen(worker, env=env, stdout=log_file,
                                                  stderr=subprocess.STDOUT)

    def wait_connected(self, node: LocalNode, *, timeout: float | None = None) -> None:
        """Wait until the SuperLink accepted ``node`` (raise if it exited)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        starts = 1
        while time.monotonic() < deadline:
            code = node.exit_code()
            if code is not None:
                text = self.node_log(node)
                if ADDRESS_IN_USE in text and starts < BIND_ATTEMPTS:
                    # another process took the Runtime API's port after free_port chose it
                    self.stop_node(node)
                    node.port = free_port()
                    self.start_node(node)
                    starts += 1
                    continue
                raise DeploymentError(
                    f"SuperNode {node.name} exited with status {code}"
                    + (" (the SuperLink did not activate it: its key is not registered, or "
                       "the node is still online from an earlier process)"
                       if NODE_REFUSED_LOG in text else "")
                    + ":\n" + text[-2000:])
            if "SuperNode ID:" in self.node_log(node):
                return
            time.sleep(0.1)
        raise DeploymentError(f"SuperNode {node.name} did not connect within "
                              f"{timeout or self.startup_timeout:g} s")

    @staticmethod
    def node_log(node: LocalNode) -> str:
        """What ``node`` logged since it was (re)started."""
        with node.log_path.open("rb") as fh:
            fh.seek(node.log_offset)
            return fh.read().decode(errors="replace")

    def process_ids(self) -> list[int]:
        """Every live process this deployment started (and their descendants)."""
        roots = [p.pid for p in [self._superlink] if p is not None]
        for node in self.nodes:
            roots += [p.pid for p in (node.supernode, node.clientapp) if p is not None]
        found = set(roots) | set(self._superlink_family)
        for pid in roots:
            found.update(descendants(pid))
        return sorted(pid for pid in found if alive(pid))

    def wait_exit(self, node: LocalNode, *, timeout: float = 60.0) -> int:
        """Wait for ``node``'s SuperNode to exit; return its exit code."""
        assert node.supernode is not None
        try:
            return node.supernode.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"SuperNode {node.name} still runs after {timeout:g} s"
                                  ) from exc

    def kill_node(self, node: LocalNode) -> None:
        """SIGKILL ``node``'s SuperNode and its ClientApp process (a crash, no goodbye)."""
        for proc in (node.supernode, node.clientapp):
            if proc is not None and proc.poll() is None:
                node.family += descendants(proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        self.stop_node(node)

    def stop_node(self, node: LocalNode) -> None:
        """Stop ``node``'s processes (and what they started), by PID."""
        for attr in ("clientapp", "supernode"):
            proc = getattr(node, attr)
            if proc is not None:
                stop_tree(proc, grace=5, family=node.family)
                setattr(node, attr, None)
        node.family = [pid for pid in node.family if alive(pid)]

    def node_state_dirs(self) -> list[Path]:
        """Every node's state directory, in node order."""
        return [node.state_dir for node in self.nodes]


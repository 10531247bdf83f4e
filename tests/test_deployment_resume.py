"""After a SuperLink crash, the same training command resumes into the same run directory.

A real ``flower-superlink`` (TLS, SuperNode authentication, a ``--database``) and three
SuperNodes on loopback. While a training run is in its rounds the SuperLink and everything
it started (its SuperExec and the run's ServerApp) are killed — a crash of the server
machine. The SuperLink is started again on the same port with the same database; the
SuperNodes reconnect by themselves with the same keys (so the same node ids); the run the
crash interrupted is stopped (``flwr ls`` / ``flwr stop``, as an operator would); the same
command resumes from the last complete round into the same run directory, and ends on the
model an uninterrupted in-process run ends on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import small_config

from fedforget.engine import declared_run_config, run_training
from fedforget.engine.apps import find_project
from fedforget.engine.deployment import LocalDeployment
from fedforget.engine.processes import descendants, flower_bin, free_port
from fedforget.history import HistoryStore
from fedforget.rundir import RunDirectory
from fedforget.settings import RunSettings

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

ROUNDS = 12


class CrashableDeployment(LocalDeployment):
    """A LocalDeployment whose SuperLink can crash and come back on the same address."""

    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink and every process it started (listed first, by PID)."""
        assert self._superlink is not None
        family = descendants(self._superlink.pid)
        self._superlink.kill()
        self._superlink.wait(timeout=10)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._superlink_family = [p for p in self._superlink_family if p not in family]

    def restart_superlink(self) -> None:
        """Start the SuperLink again: same port, certificates and database."""
        port = int(self.address.rsplit(":", 1)[1])
        command = self.superlink_command(port, free_port(), free_port())
        with (self.home / "superlink.log").open("ab") as log_file:
            self._superlink = subprocess.Popen(command, env=self.env(), stdout=log_file,
                                               stderr=subprocess.STDOUT)
        self._wait_listening(port)

    def flwr(self, *args: str) -> str:
        """Run a ``flwr`` command against this SuperLink; its stdout."""
        done = subprocess.run([flower_bin("flwr"), *args], env=self.env(), text=True,
                              capture_output=True, timeout=120, check=True)
        return done.stdout


def _config() -> Any:
    return small_config(**{"num-clients": 3, "num-rounds": ROUNDS, "local-epochs": 3,
                           "synthetic-samples": 900})


def _run_config(out: Path) -> dict[str, Any]:
    run = RunSettings(out_dir=str(out), progress=False, engine="deployment", node_auth=True)
    return declared_run_config(find_project(), {**_config().to_mapping(),
                                                **run.to_run_config()})


def _rounds_done(run: RunDirectory) -> int:
    if not run.metrics.exists():
        return 0
    return sum(1 for line in run.metrics.read_text().splitlines() if line.strip())


def test_after_a_superlink_crash_the_same_command_resumes_into_the_same_run_directory(
        tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    with CrashableDeployment(tmp_path / "federation", num_nodes=3) as federation:
        node_ids = [node.node_id for node in federation.nodes]
        # Prepare: training on the SuperNodes, in the background
        failure: list[BaseException] = []

        def train() -> None:
            try:
                federation.run(_run_config(run.path), timeout=600)
            except BaseException as exc:  # noqa: BLE001 - the crash ends this run
                failure.append(exc)

        first = threading.Thread(target=train)
        first.start()
        deadline = time.monotonic() + 400
        while _rounds_done(run) < 2 and first.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Execute: the server machine crashes mid-training ...
        federation.crash_superlink()
        with HistoryStore.open(run.path) as store:
            interrupted_at = store.last_round
        assert 2 <= interrupted_at < ROUNDS, interrupted_at
        # ... comes back with its database; the run it lost is stopped ...
        federation.restart_superlink()
        out = federation.flwr("ls", federation.connection, "--format", "json")
        listed = json.loads(out[out.index("{"):])
        for entry in listed["runs"]:
            if not str(entry["status"]).startswith("finished"):
                federation.flwr("stop", str(entry["run-id"]), federation.connection)
        first.join(timeout=300)
        assert failure, "the interrupted run must not report success"
        # ... and the same command resumes
        federation.run(_run_config(run.path), timeout=600)
        nodes = json.loads(run.nodes.read_text())
    # Assert: every round once, by the same pinned nodes, ending where an uninterrupted
    # run ends
    assert nodes["pins"] == {f"client-00{i}": node_ids[i] for i in range(3)}
    assert nodes["refused"] == []
    with HistoryStore.open(run.path) as store:
        assert store.last_round == ROUNDS
        assert store.clients()["client-001"] == list(range(1, ROUNDS + 1))
        resumed = store.model_digest(ROUNDS)
    reference = tmp_path / "inprocess"
    run_training(_config(), out=reference, engine="inprocess", progress=False)
    with HistoryStore.open(reference) as store:
        assert store.model_digest(ROUNDS) == resumed

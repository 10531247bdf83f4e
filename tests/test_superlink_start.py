"""A SuperLink whose freshly chosen port another process takes before it binds is started
again on other ports (the race that once failed a CI run: ``address already in use``)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedforget.engine import simulation
from fedforget.engine.processes import free_port


def test_a_port_taken_before_the_superlink_binds_it_is_chosen_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the first port handed out is already bound by this process (not listening:
    # a connection to it must not pass for the SuperLink's)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        handed: list[int] = []

        def ports() -> Iterator[int]:
            yield busy
            while True:
                yield free_port()

        source = ports()

        def next_port() -> int:
            handed.append(next(source))
            return handed[-1]

        monkeypatch.setattr(simulation, "free_port", next_port)
        # Execute
        with simulation.local_superlink(tmp_path / "home") as connection:
            config = (tmp_path / "home" / "config.toml").read_text()
        # Assert: a second start on fresh ports, named in the connection it wrote
        assert connection == simulation.CONNECTION
        assert len(handed) == 8 and handed[0] == busy
        assert f"127.0.0.1:{handed[4]}" in config and str(busy) not in config


def test_another_failure_is_not_retried(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # a "SuperLink" that exits at once, with no bind error: reported, not started again
    calls: list[int] = []
    real = simulation._start_superlink

    def start(home: Path, env: object) -> object:
        calls.append(1)
        return real(home, env)  # type: ignore[arg-type]

    monkeypatch.setattr(simulation, "_start_superlink", start)
    monkeypatch.setattr(simulation, "_bin", lambda name: "/bin/false")
    with (pytest.raises(simulation.SimulationError, match="exited with code 1"),
          simulation.local_superlink(tmp_path / "home")):
        pass
    assert calls == [1]


def test_a_supernode_whose_port_was_taken_is_started_on_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a deployment of one node; the port chosen for the node's Runtime API
    # (the fourth port handed out: the SuperLink's three come first) is held here
    from fedforget.engine import deployment

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        handed: list[int] = []

        def next_port() -> int:
            handed.append(busy if len(handed) == 3 else free_port())
            return handed[-1]

        monkeypatch.setattr(deployment, "free_port", next_port)
        # Execute
        federation = deployment.LocalDeployment(tmp_path / "fed", num_nodes=1, warm=False,
                                                database=False)
        try:
            federation.start()
            node = federation.nodes[0]
            # Assert: the node runs, on a port other than the one taken
            assert node.exit_code() is None
            assert node.port != busy and handed[3] == busy and len(handed) == 5
            assert "address already in use" in node.log_path.read_text()
        finally:
            federation.stop()
        assert federation.process_ids() == []

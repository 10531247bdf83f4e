"""The deployment engine: credentials, connections, polling, and a real federation on loopback.

The tests marked ``deployment`` start a real ``flower-superlink`` with TLS and SuperNode
authentication and three real ``flower-supernode`` processes (certificates and keys made
here, every process stopped by its PID at the end) and train fedforget's app on them.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import deploy_doc, small_config
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedforget.engine import declared_run_config, run_training
from fedforget.engine.apps import find_project
from fedforget.engine.credentials import make_node_key, make_tls_files
from fedforget.engine.deployment import (
    NODE_REFUSED_LOG,
    LocalDeployment,
    SuperLinkTarget,
    node_config_string,
    run_deployment,
    write_connection,
)
from fedforget.engine.polling import PollingGrid
from fedforget.engine.processes import alive
from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.rundir import RunDirectory
from fedforget.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------- credentials
def test_node_key_is_an_openssh_p384_pair_readable_by_its_owner_only(tmp_path: Path) -> None:
    # Execute
    pair = make_node_key(tmp_path, "node-0")
    # Assert: what flower-supernode --auth-supernode-private-key loads
    key = load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600


def test_superlink_certificate_is_issued_by_the_ca_for_the_loopback_names(
        tmp_path: Path) -> None:
    # Execute
    files = make_tls_files(tmp_path, hosts=("127.0.0.1", "localhost"))
    # Assert
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_make_tls_files_refuses_no_hosts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hosts = \(\): expected at least one address"):
        make_tls_files(tmp_path, hosts=())


# ----------------------------------------------------------------------- connections
def test_write_connection_is_the_default_tls_connection(tmp_path: Path) -> None:
    # Execute
    path = write_connection(tmp_path, "lab", address="10.0.0.5:9093",
                            root_certificates=tmp_path / "ca.pem")
    # Assert
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "lab"
    assert config["superlink"]["lab"] == {
        "address": "10.0.0.5:9093", "root-certificates": str(tmp_path / "ca.pem")}


def test_target_from_an_address_needs_its_root_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without --root-certificates"):
        SuperLinkTarget.from_cli("10.0.0.5:9093")
    with pytest.raises(ConfigError, match=r"--root-certificates 'nope.pem': no such file"):
        SuperLinkTarget.from_cli("10.0.0.5:9093", "nope.pem")
    with pytest.raises(ConfigError, match="a named connection takes root-certificates"):
        SuperLinkTarget.from_cli("lab", str(tmp_path))
    with pytest.raises(ConfigError, match=r"expected host:port"):
        SuperLinkTarget.from_cli("10.0.0.5:http")
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    target = SuperLinkTarget.from_cli("10.0.0.5:9093", str(pem))
    assert (target.address, target.root_certificates) == ("10.0.0.5:9093", pem.resolve())
    assert SuperLinkTarget.from_cli("lab") == SuperLinkTarget(connection="lab")


def test_node_config_string_is_read_back_by_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    # Prepare
    values = {"partition-id": 2, "num-partitions": 3, "state-dir": "/srv/node 2/state"}
    # Execute
    text = node_config_string(values)
    # Assert
    assert text == 'partition-id=2 num-partitions=3 state-dir="/srv/node 2/state"'
    assert parse_config_args([text]) == values


# ----------------------------------------------------------------------- polling
class _SlowGrid:
    """Replies to message i appear at the ``due[i]``-th pull; counts pulls."""

    def __init__(self, due: list[int]) -> None:
        self.due = due
        self.pulls = 0

    def push_messages(self, messages: Any) -> list[str]:
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.pulls += 1
        from types import SimpleNamespace

        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i),
                                has_content=lambda: False)
                for i in ids if self.due[int(i)] <= self.pulls]


def test_polling_grid_returns_every_reply_after_short_waits() -> None:
    # Prepare: replies come at the 1st, 3rd and 4th pull
    grid = _SlowGrid([1, 3, 4])
    polling = PollingGrid(grid, initial_interval=0.001, max_interval=0.002)  # type: ignore[arg-type]
    # Execute
    messages: Any = ["a", "b", "c"]  # the fake grid only counts them
    replies = list(polling.send_and_receive(messages, timeout=5))
    # Assert: four pulls; no fifth once all three replied
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert grid.pulls == 4


def test_polling_grid_returns_what_came_within_the_timeout() -> None:
    grid = _SlowGrid([1, 10**9])
    polling = PollingGrid(grid, initial_interval=0.01, max_interval=0.01)  # type: ignore[arg-type]
    started = time.monotonic()
    messages: Any = ["a", "b"]
    replies = list(polling.send_and_receive(messages, timeout=0.2))
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert 0.2 <= time.monotonic() - started < 2.0


def test_fast_polling_wraps_only_the_deployment_grid() -> None:
    from fedforget.engine.inprocess import InProcessGrid
    from fedforget.engine.polling import fast_polling

    grid = InProcessGrid(find_project(ROOT).load()[1], num_nodes=1, run_config={})
    assert fast_polling(grid) is grid


def test_a_warm_process_forgets_the_modules_of_a_previous_fab(tmp_path: Path) -> None:
    from fedforget.engine.warm_clientapp import _forget_modules_under

    # Prepare: a module imported from an "installed FAB" directory
    (tmp_path / "fabmod_x1.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    import fabmod_x1  # noqa: F401

    # Execute
    _forget_modules_under(tmp_path.resolve())
    # Assert: a new FAB's module of the same name would be imported afresh
    assert "fabmod_x1" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_supernode_waits_start_short_grow_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedforget.engine import supernode

    # Prepare: record the sleeps instead of sleeping
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    poll = supernode._ShortPoll(0.02, 0.05)
    # Execute: four idle waits (Flower's 3 s), a reply wait (0.5 s), an idle wait
    for seconds in (3, 3, 3, 3, 0.5, 3):
        poll.sleep(seconds)
    # Assert: 0.02, ×1.5 = 0.03, ×1.5 = 0.045, capped at 0.05; reply wait capped at the
    # start, and the next idle wait starts again at 0.02
    assert slept == pytest.approx([0.02, 0.03, 0.045, 0.05, 0.02, 0.02])


def test_supernode_patch_refuses_a_bad_interval() -> None:
    from fedforget.engine.supernode import patch_poll_interval

    with pytest.raises(ConfigError, match=r"poll interval = 0 s, max = 0 s: expected"):
        patch_poll_interval(0)


# ----------------------------------------------------------------------- a federation
DEPLOYED = {"num-clients": 3, "num-rounds": 3}  # for the run-config of federation.run


def doc_blocks(kind: str, section: str | None = None) -> list[str]:
    """The ``kind`` (bash, toml) code blocks of the README's Deploy section (of its
    ``## section``)."""
    text = deploy_doc()
    if section is not None:
        text = text[text.index(f"\n## {section}\n"):]
        text = text[:text.find("\n## ", 1)] if "\n## " in text[1:] else text
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S)


def doc_commands(section: str | None = None) -> list[list[str]]:
    """The commands of the doc's bash blocks, split as a shell would (no expansion);
    ``export``/``VAR=$!`` lines and a trailing ``&`` left out."""
    out = []
    for block in doc_blocks("bash", section):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith(("#", "export ")) or re.match(r"^\w+=\$!$", line):
                continue
            out.append(shlex.split(line.removesuffix("&").strip()))
    return out


def doc_form(federation: Any, argv: list[str]) -> list[str]:
    """``argv`` as the doc writes it: ``$DEPLOY`` for the directory, ``python`` and bare
    console-script names, the doc's ports (SuperLink 9000, legacy 9091/9092, node i 9100+i),
    ``$SUPERNODE_PID`` for the parent PID."""
    superlink = next(c for c in federation.commands if "--enable-supernode-auth" in c)
    ports = {federation.address.rsplit(":", 1)[1]: "9000"}
    for flag, doc_port in (("--control-api-address", "9091"), ("--fleet-api-address", "9092")):
        ports[superlink[superlink.index(flag) + 1].rsplit(":", 1)[1]] = doc_port
    for node in federation.nodes:
        if node.name.startswith("node-"):
            ports[str(node.port)] = str(9100 + int(node.name.removeprefix("node-")))
    bin_dir = str(Path(sys.executable).parent) + "/"
    out = []
    for i, token in enumerate(argv):
        if i and argv[i - 1] == "--parent-pid":
            out.append("$SUPERNODE_PID")
            continue
        token = token.replace(str(federation.directory), "$DEPLOY")
        token = "python" if token == sys.executable else token.removeprefix(bin_dir)
        for port, doc_port in ports.items():
            token = re.sub(rf"(?<![0-9]){port}(?![0-9])", doc_port, token)
        out.append(token)
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A SuperLink (TLS, SuperNode authentication) and three registered SuperNodes."""
    started: list[int] = []
    with LocalDeployment(tmp_path_factory.mktemp("federation"), num_nodes=3) as fed:
        yield fed
        started = fed.process_ids()
    assert started  # the SuperLink at least (the nodes some tests killed are gone already)
    assert [pid for pid in started if alive(pid)] == []  # all stopped, by PID


def _train(federation: Any, doc_command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the doc's ``fedforget train ...`` through the CLI's main, with ``$DEPLOY`` and
    the SuperLink's address (the doc's ``127.0.0.1:9000``) those of ``federation``."""
    from fedforget.cli import main

    monkeypatch.setenv("FLWR_HOME", str(federation.home))
    argv = [t.replace("$DEPLOY", str(federation.directory)).replace(
        "127.0.0.1:9000", federation.address) for t in doc_command[1:]]
    assert main(argv) == 0


def _doc_train_commands() -> list[list[str]]:
    """The ``fedforget train`` commands of the doc's "Train" section."""
    return [c for c in doc_commands("Train") if c[:2] == ["fedforget", "train"]]


def _write_doc_config(federation: Any) -> Path:
    block = next(b for b in doc_blocks("toml") if b.startswith("# $DEPLOY/deploy.toml"))
    path = federation.directory / "deploy.toml"
    path.write_text(block)
    return path


def _task_lines(node: Any) -> int:
    return node.log_path.read_text().count("fedforget.warm_clientapp: task done")


@pytest.mark.deployment
@pytest.mark.slow
def test_deployed_training_gives_the_in_process_model(
        federation: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedforget.config import load_config

    # Prepare: the doc's config and its first `fedforget train` command (a named connection)
    config = _write_doc_config(federation)
    named = next(c for c in _doc_train_commands() if "fedforget-local" in c)
    out = federation.directory / "runs" / "deployed"
    before = [_task_lines(node) for node in federation.nodes]
    # Execute
    _train(federation, named, monkeypatch)
    run_training(load_config(config), out=tmp_path / "inprocess", progress=False)
    # Assert: the same final model, bit for bit (clients aggregate in client-id order)
    with (HistoryStore.open(out) as deployed,
          HistoryStore.open(tmp_path / "inprocess") as inprocess):
        assert deployed.last_round == 3
        assert deployed.clients() == inprocess.clients() == {
            f"client-00{i}": [1, 2, 3] for i in range(3)}
        assert deployed.summary()["final_model_digest"] == \
            inprocess.summary()["final_model_digest"]
    for before_count, node in zip(before, federation.nodes, strict=True):
        # the warm process served every message: identify, 3 train rounds, 1 evaluate
        assert _task_lines(node) - before_count == 1 + 3 + 1
        assert (node.state_dir / "head.json").is_file()  # the client kept the tree head
    pins = json.loads(RunDirectory(out).nodes.read_text())
    assert pins["node_auth"] is True
    assert pins["pins"] == {f"client-00{i}": federation.nodes[i].node_id for i in range(3)}


def _set_up_by_the_federation(command: list[str]) -> bool:
    """A command of the doc that :class:`LocalDeployment` runs (credentials, SuperLink,
    registration, SuperNodes); the others (``fedforget ...``) are run by the tests."""
    return (command[0] == "flower-superlink" or command[:3] == ["flwr", "supernode", "register"]
            or (command[:2] == ["python", "-m"] and command[2].startswith("fedforget.engine.")))


@pytest.mark.deployment
def test_the_deploy_doc_shows_the_commands_the_federation_ran(federation: Any) -> None:
    # Prepare: what the federation ran (credentials, SuperLink, registration, node 0)
    ran = [doc_form(federation, c) for c in federation.commands]
    documented = [c for c in doc_commands() if _set_up_by_the_federation(c)]
    node0 = [c for c in ran if any("node-0" in t or t.endswith(":9100") for t in c)]
    # Assert: every documented command ran, as written ...
    for command in documented:
        assert command in ran, shlex.join(command)
    # ... and the doc shows every command that set up the SuperLink and node 0
    for command in [ran[0], *node0, next(c for c in ran if c[0] == "flower-superlink")]:
        assert command in documented, shlex.join(command)
    assert {c[2] for c in documented if c[0] == "python"} == {
        "fedforget.engine.credentials", "fedforget.engine.supernode",
        "fedforget.engine.warm_clientapp"}
    # the doc's config.toml is the one written for the connection
    connection = next(b for b in doc_blocks("toml") if b.startswith("[superlink]"))
    written = (federation.home / "config.toml").read_text()
    assert tomllib.loads(connection) == tomllib.loads(
        written.replace(str(federation.directory), "$DEPLOY").replace(
            federation.address, "127.0.0.1:9000"))


@pytest.mark.deployment
def test_a_supernode_with_an_unregistered_key_is_refused(federation: Any) -> None:
    # Execute
    stranger = federation.add_node({"partition-id": 0, "num-partitions": 3},
                                   name="stranger", register=False, wait=False)
    code = federation.wait_exit(stranger, timeout=120)
    # Assert: refused at activation (Flower's exit code 305, logged; process status 1)
    log = federation.node_log(stranger)
    federation.stop_node(stranger)
    assert code == 1
    assert NODE_REFUSED_LOG == "Exit Code: 305" and NODE_REFUSED_LOG in log
    assert "Failed to activate SuperNode" in log
    assert "SuperNode ID:" not in log  # it never joined


@pytest.mark.deployment
@pytest.mark.slow
def test_a_registered_node_claiming_a_pinned_client_id_is_refused(
        federation: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedforget.config import load_config

    # Prepare: a registered node says it is client-000, with partition 1's data
    impostor = federation.add_node(
        {"client-id": "client-000", "partition-id": 1, "num-partitions": 3}, name="impostor")
    resume = next(c for c in _doc_train_commands() if "--root-certificates" in c)
    out = federation.directory / "runs" / "deployed"
    # Execute: the doc's resume command extends the run of the first test to 4 rounds
    try:
        _train(federation, resume, monkeypatch)
    finally:
        federation.stop_node(impostor)
    run_training(load_config(_write_doc_config(federation), **{"num-rounds": 4}),
                 out=tmp_path / "inprocess", progress=False)
    # Assert: refused, recorded; the real client-000 trained round 4; no trace of partition 1
    # beyond client-001's own in the model (it equals the in-process run's)
    refused = json.loads(RunDirectory(out).nodes.read_text())["refused"]
    assert [(r["node_id"], r["client_id"]) for r in refused] == [
        (impostor.node_id, "client-000")]
    # (refused as pinned, or, when the real node answered first, as already spoken for)
    assert re.search(r"pinned to node|already speaks for client-000", refused[0]["reason"])
    with (HistoryStore.open(out) as deployed,
          HistoryStore.open(tmp_path / "inprocess") as inprocess):
        assert deployed.last_round == 4
        assert deployed.clients() == {f"client-00{i}": [1, 2, 3, 4] for i in range(3)}
        assert deployed.summary()["final_model_digest"] == \
            inprocess.summary()["final_model_digest"]


@pytest.mark.deployment
@pytest.mark.slow
def test_a_node_killed_mid_run_is_dropped_after_the_reply_timeout(
        federation: Any, tmp_path: Path) -> None:
    # Prepare: a short reply timeout; node-2 (client-002) dies once round 1 is committed;
    # the run goes to the SuperLink's address (a private FLWR_HOME with its CA)
    reply_timeout = 5.0
    out = tmp_path / "run"
    victim = next(n for n in federation.nodes if n.name == "node-2")
    target = SuperLinkTarget.from_cli(federation.address, str(federation.tls.ca_cert))
    outcome: dict[str, Any] = {}

    def submit() -> None:
        try:
            outcome["run"] = run_deployment(_run_config(out, reply_timeout=reply_timeout),
                                            connection=target, project=find_project(ROOT),
                                            timeout=900, progress=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=submit)
    metrics = RunDirectory(out).metrics
    # Execute
    thread.start()
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    federation.kill_node(victim)
    killed_at = time.monotonic()
    thread.join(timeout=900)
    # Assert: the run finished; rounds after the kill went on without client-002
    if "error" in outcome:
        raise outcome["error"]
    finished_after = time.monotonic() - killed_at
    with HistoryStore.open(out) as store:
        assert store.last_round == 3
        rounds = [store.round(t) for t in (1, 2, 3)]
    assert [sorted(p.client_id for p in r.participants) for r in rounds] == [
        ["client-000", "client-001", "client-002"],
        ["client-000", "client-001"],
        ["client-000", "client-001"],
    ]
    refused = [[(x.client_id, x.reason) for x in r.refused] for r in rounds[1:]]
    print(f"killed node: refused {refused}; run finished {finished_after:.1f} s after the kill",
          file=sys.stderr)
    assert all(("client-002", "no reply") in r for r in refused)


def _run_config(out: Path, **settings: Any) -> dict[str, Any]:
    cfg = small_config(**DEPLOYED)
    run = RunSettings(out_dir=str(out), progress=False, engine="deployment", node_auth=True,
                      **settings)
    return declared_run_config(find_project(ROOT), {**cfg.to_mapping(), **run.to_run_config()})


@pytest.mark.deployment
def test_a_stopped_supernode_rejoins_under_its_registered_node_id(federation: Any) -> None:
    # Prepare
    node = next(n for n in federation.nodes if n.name == "node-0")
    assert f"SuperNode ID: {node.node_id}" in federation.node_log(node)
    # Execute: stop it (SIGTERM) and start it again with the same key
    federation.stop_node(node)
    federation.start_node(node)
    federation.wait_connected(node)
    # Assert: the id the registration gave, so the server's client -> node map still holds
    assert f"SuperNode ID: {node.node_id}" in federation.node_log(node)
    assert node.supernode is not None and alive(node.supernode.pid)


def test_the_doc_runs_every_train_command_it_shows() -> None:
    # the two `fedforget train` commands of "Train" are the ones the tests above run
    commands = _doc_train_commands()
    assert len(commands) == 2
    assert any("fedforget-local" in c for c in commands)
    assert any("--root-certificates" in c for c in commands)


def test_pyproject_registers_the_deployment_marker() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    markers = config["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("deployment:") for m in markers), json.dumps(markers)


def test_fast_polling_wraps_the_simulation_grid_once() -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedforget.engine.polling import PollingGrid, fast_polling

    grid = InMemoryGrid.__new__(InMemoryGrid)  # its constructor wants a running LinkState
    wrapped = fast_polling(grid)
    assert isinstance(wrapped, PollingGrid) and wrapped.grid is grid
    assert fast_polling(wrapped) is wrapped

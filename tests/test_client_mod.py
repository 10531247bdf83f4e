"""fedforget's client mod on its own: identify, tag, seed, epochs, tree head; and a request
whose app fails before serving it ends ``failed`` with the reason."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, train_small
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedforget import protocol
from fedforget.clients.mod import unlearning_mod, unlearning_mod_with
from fedforget.errors import ConfigError
from fedforget.withdrawal import WithdrawalLedger


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the identity of the task that creates them (as in
    # fedforget.engine.inprocess).
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _context(**node: object) -> Context:
    return Context(run_id=1, node_id=5, node_config=dict(node), state=RecordDict(),
                   run_config={"local-epochs": 3, "fedforget.out-dir": ""})


def _message(config: dict[str, object]) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord(config)}), dst_node_id=5,
                   message_type="train")


def _echo(seen: list[object]):  # type: ignore[no-untyped-def]
    def handler(msg: Message, context: Context) -> Message:
        seen.append((torch.rand(1).item(), np.random.rand(), random.random(),
                     context.run_config["local-epochs"]))
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)
    return handler


def test_identify_is_answered_by_the_mod_without_calling_the_app() -> None:
    called: list[object] = []
    reply = unlearning_mod(_message({protocol.TASK: protocol.IDENTIFY}),
                           _context(**{"partition-id": 7}), _echo(called))
    assert called == []
    assert reply.content[protocol.CLIENT_RECORD][protocol.CLIENT_ID] == "client-007"


def test_the_data_size_is_computed_and_told_only_when_the_server_asks() -> None:
    # Prepare: an app whose data size is counted when it is computed
    sized: list[int] = []

    def data_size(context: Context) -> int:
        sized.append(1)
        return 37

    mod = unlearning_mod_with(data_size=data_size)
    ctx = _context(**{"partition-id": 2})
    # Execute: identify without the ask (a server with no example cap), then with it
    plain = mod(_message({protocol.TASK: protocol.IDENTIFY}), ctx, _echo([]))
    asked = mod(_message({protocol.TASK: protocol.IDENTIFY,
                          protocol.WANT_NUM_EXAMPLES: True}), ctx, _echo([]))
    # Assert
    assert protocol.NUM_EXAMPLES not in plain.content[protocol.CLIENT_RECORD]
    assert asked.content[protocol.CLIENT_RECORD][protocol.NUM_EXAMPLES] == 37
    assert len(sized) == 1


def test_an_explicit_client_id_wins_and_a_node_without_either_is_refused() -> None:
    reply = unlearning_mod(_message({protocol.TASK: protocol.IDENTIFY}),
                           _context(**{"client-id": "hospital-a", "partition-id": 0}),
                           _echo([]))
    assert reply.content[protocol.CLIENT_RECORD][protocol.CLIENT_ID] == "hospital-a"
    with pytest.raises(ConfigError, match="neither 'client-id' nor 'partition-id'"):
        unlearning_mod(_message({}), _context(), _echo([]))


def test_the_same_seed_gives_the_same_draws_and_the_caller_state_is_restored() -> None:
    # Prepare
    seen: list[object] = []
    ctx = _context(**{"partition-id": 1})
    torch.manual_seed(123)
    expected_next = torch.rand(1).item()
    torch.manual_seed(123)
    # Execute: two calls with one seed, one with another
    for seed in (42, 42, 43):
        reply = unlearning_mod(_message({protocol.SEED: seed}), ctx, _echo(seen))
        assert reply.content[protocol.CLIENT_RECORD][protocol.CLIENT_ID] == "client-001"
    # Assert
    assert seen[0] == seen[1] and seen[0][:3] != seen[2][:3]
    assert torch.rand(1).item() == expected_next  # the global generator is as it was


def _same_numpy_state(a: tuple, b: tuple) -> bool:  # type: ignore[type-arg]
    return (a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:])


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_numpys_global_state_comes_back_whole_gaussian_cache_included(steps: int) -> None:
    # Prepare: a caller whose numpy stream is left in each way the mod must restore
    # (words only; a cached Gaussian from an odd number of legacy normals; a state set by
    # hand with a cached value; a state set by hand to the words the mod last wrote, its
    # cache empty) and handlers that leave their own Gaussian cached or draw nothing.
    ctx = _context(**{"partition-id": 1})
    np.random.seed(2024)

    def normals(msg: Message, context: Context) -> Message:
        np.random.standard_normal(3)  # odd: a Gaussian stays cached in the handler's state
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    handlers = [normals, _echo([])]
    callers = [
        lambda: np.random.rand(2),
        lambda: np.random.standard_normal(1),
        lambda: np.random.set_state(("MT19937", np.arange(624, dtype=np.uint32), 7, 1, 0.25)),
        lambda: None,
    ]
    for i in range(12):
        for _ in range(steps):
            callers[(i + steps) % len(callers)]()
        before = np.random.get_state()
        # Execute
        unlearning_mod(_message({protocol.SEED: 40 + i}), ctx, handlers[i % 2])
        # Assert: the whole legacy state, and the draws that follow, are the caller's
        after = np.random.get_state()
        assert _same_numpy_state(before, after), (i, before[2:], after[2:])
        reference = np.random.RandomState()
        reference.set_state(before)
        assert np.array_equal(np.random.standard_normal(3), reference.standard_normal(3))
        np.random.set_state(after)


def test_epochs_a_method_asks_for_override_the_apps_setting_for_one_call() -> None:
    seen: list[object] = []
    ctx = _context(**{"partition-id": 1})
    unlearning_mod(_message({protocol.LOCAL_EPOCHS: 1, protocol.LOCAL_EPOCHS_KEY: "local-epochs"}),
                   ctx, _echo(seen))
    assert seen[0][3] == 1 and ctx.run_config["local-epochs"] == 3


def test_the_largest_tree_head_is_kept_in_the_state_directory(tmp_path: Path) -> None:
    ctx = _context(**{"partition-id": 2, "state-dir": str(tmp_path / "me")})
    for size in (2, 5, 3):
        head = json.dumps({"size": size, "root": "x" * 10})
        unlearning_mod(_message({protocol.TREE_HEAD: head}), ctx, _echo([]))
    assert json.loads((tmp_path / "me" / "head.json").read_text())["size"] == 5


def test_a_process_that_starts_again_keeps_the_largest_head_it_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedforget.clients import mod

    ctx = _context(**{"partition-id": 2, "state-dir": str(tmp_path / "me")})
    saved = tmp_path / "me" / "head.json"

    def show(size: int) -> None:
        head = json.dumps({"size": size, "root": "x" * 10})
        unlearning_mod(_message({protocol.TREE_HEAD: head}), ctx, _echo([]))

    def restart() -> None:  # a new process: nothing known of what was saved
        monkeypatch.setattr(mod, "_saved_heads", {})

    show(4)
    first = saved.read_bytes()
    restart()
    show(4)  # the same head again: the file is left as it is
    assert saved.read_bytes() == first
    restart()
    show(3)  # a smaller head: the larger one saved before stays
    assert json.loads(saved.read_text())["size"] == 4
    restart()
    show(7)
    assert json.loads(saved.read_text())["size"] == 7
    saved.write_text(json.dumps({"size": 9, "root": "y"}))  # another writer saved a larger one
    restart()
    show(8)
    assert json.loads(saved.read_text())["size"] == 9


def test_a_request_whose_app_fails_before_serving_it_ends_failed(tmp_path: Path) -> None:
    # Prepare: a run, and an "app" with the run's keys whose ServerApp raises
    from fedforget.engine import run_unlearning

    run = tmp_path / "run"
    train_small(run)
    app = tmp_path / "broken-app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    pyproject = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(pyproject.replace('serverapp = "server.app:app"',
                                                          'serverapp = "broken_server:app"'))
    (app / "broken_server.py").write_text(
        "from flwr.serverapp import ServerApp\napp = ServerApp()\n\n"
        "@app.main()\ndef main(grid, context):\n    raise KeyError('num-server-rounds')\n")
    # Execute
    with pytest.raises(KeyError):
        run_unlearning(run, client="client-001", method="rollback", app_dir=app,
                       progress=False)
    # Assert
    with WithdrawalLedger(run) as ledger:
        request = ledger.for_client("client-001")
    assert request is not None and request.state == "failed"
    assert "the app failed: KeyError" in request.detail["error"]  # type: ignore[index]

"""Packed arrays (fedforget.transport): the same tensors bit for bit, fewer Flower objects
per message; the client mod unpacks and packs; the deployment Grid's wrapper packs only for
nodes that said they unpack."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedforget import protocol, transport
from fedforget.clients.mod import unlearning_mod
from fedforget.engine.polling import PollingGrid


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": np.zeros(0, np.float32),                 # an empty tensor
            "scale": np.array(2.5, dtype=np.float64),     # a 0-d one
            "steps": np.arange(5, dtype=np.int64)}


def _content(seed: int = 0) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in _arrays(seed).items()}),
        "config": ConfigRecord({"lr": 0.1}),
        "metrics": MetricRecord({"loss": 0.5}),
    })


def test_unpack_gives_back_the_very_record_that_was_packed() -> None:
    content = _content()
    packed = transport.pack(content)
    assert list(packed) == [transport.PACKED_PREFIX + "arrays", "config", "metrics"]
    assert transport.is_packed(packed) and not transport.is_packed(content)
    restored = transport.unpack(packed)
    # same keys in the same order, the other records untouched, the arrays' object id (a
    # hash over every array's dtype, shape, stype and bytes) unchanged
    assert list(restored) == ["arrays", "config", "metrics"]
    assert restored["config"] is content["config"]
    assert restored["arrays"].object_id == content["arrays"].object_id
    for name, expected in _arrays().items():
        got = restored["arrays"][name].numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()


def test_a_train_message_of_four_tensors_is_four_objects_instead_of_twelve() -> None:
    # Message, RecordDict, ConfigRecord, ArrayRecord and an Array plus an ArrayChunk per
    # tensor: 4 + 2 * 4 = 12; packed: Message, RecordDict and two ConfigRecords
    arrays = ArrayRecord({k: Array(v) for k, v in _arrays().items() if v.size})
    arrays["extra"] = Array(np.ones(2, np.float32))
    assert len(arrays) == 4
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})})
    plain = Message(content=content, dst_node_id=3, message_type="train")
    packed = Message(content=transport.pack(content), dst_node_id=3, message_type="train")
    assert len(get_all_nested_objects(plain)) == 12
    assert len(get_all_nested_objects(packed)) == 4


def test_a_record_larger_than_the_limit_and_an_empty_one_stay_as_they_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    content = _content()
    size = sum(len(a.data) for a in content["arrays"].values())
    monkeypatch.setenv("FEDFORGET_PACK_LIMIT", str(size - 1))
    assert transport.pack(content) is content
    monkeypatch.setenv("FEDFORGET_PACK_LIMIT", str(size))
    assert transport.is_packed(transport.pack(content))
    empty = RecordDict({"arrays": ArrayRecord()})
    assert transport.pack(empty) is empty


def test_a_malformed_packed_record_is_refused_by_name() -> None:
    packed = transport.pack(_content())
    record = packed[transport.PACKED_PREFIX + "arrays"]
    record["data"] = record["data"][:-1]  # one buffer lost
    with pytest.raises(ValueError, match="'fedforget.packed:arrays' is malformed"):
        transport.unpack(packed)


# ------------------------------------------------------------------ the client mod
def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(),
                   run_config={"fedforget.out-dir": ""})


def _app(seen: list[RecordDict]) -> Any:
    def app(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return Message(content=_content(seed=9), reply_to=msg)
    return app


def test_the_mod_says_it_unpacks_and_the_app_never_sees_a_packed_record() -> None:
    identify = Message(content=RecordDict({"config": ConfigRecord(
        {protocol.TASK: protocol.IDENTIFY})}), dst_node_id=5, message_type="train")
    reply = unlearning_mod(identify, _context(), _app([]))
    assert reply.content[protocol.CLIENT_RECORD][protocol.PACKING] is True
    # a packed train message: the app gets the ArrayRecord; its reply goes back packed
    seen: list[RecordDict] = []
    msg = Message(content=transport.pack(_content()), dst_node_id=5, message_type="train")
    reply = unlearning_mod(msg, _context(), _app(seen))
    assert list(seen[0]) == ["arrays", "config", "metrics"]
    assert seen[0]["arrays"].object_id == _content()["arrays"].object_id
    assert transport.is_packed(reply.content)
    back = transport.unpack(reply.content)
    assert back["arrays"].object_id == _content(seed=9)["arrays"].object_id
    assert back[protocol.CLIENT_RECORD][protocol.CLIENT_ID] == "client-002"
    # a plain message gets a plain reply
    reply = unlearning_mod(Message(content=_content(), dst_node_id=5, message_type="train"),
                           _context(), _app([]))
    assert not transport.is_packed(reply.content)


# ------------------------------------------------------------- the deployment Grid
class _RecordingGrid:
    """Keeps what was pushed; answers pulls with the replies it was given."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.replies: list[Any] = []

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed += list(messages)
        for i, m in enumerate(self.pushed):
            m.metadata.__dict__["_message_id"] = f"id-{i}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, ids: Any) -> list[Any]:
        out, self.replies = self.replies, []
        return out


def _reply(node: int, content: RecordDict) -> Any:
    return SimpleNamespace(content=content, has_content=lambda: True,
                           metadata=SimpleNamespace(src_node_id=node, reply_to_message_id="x"))


def test_the_grid_packs_only_for_nodes_that_unpack_and_unpacks_every_reply() -> None:
    inner = _RecordingGrid()
    grid = PollingGrid(inner, pack=True)  # type: ignore[arg-type]
    to_seven = Message(content=_content(), dst_node_id=7, message_type="train")
    grid.push_messages([to_seven])
    assert not transport.is_packed(inner.pushed[-1].content)  # nobody said it unpacks yet
    # node 7 answers identify with PACKING, node 8 without
    inner.replies = [
        _reply(7, RecordDict({protocol.CLIENT_RECORD: ConfigRecord(
            {protocol.CLIENT_ID: "a", protocol.PACKING: True})})),
        _reply(8, RecordDict({protocol.CLIENT_RECORD: ConfigRecord({protocol.CLIENT_ID: "b"})})),
    ]
    grid.pull_messages(["x"])
    assert grid.packing_nodes == {7}
    to_seven = Message(content=_content(), dst_node_id=7, message_type="train")
    to_eight = Message(content=_content(), dst_node_id=8, message_type="train")
    grid.push_messages([to_seven, to_eight])
    sent_seven, sent_eight = inner.pushed[-2:]
    assert transport.is_packed(sent_seven.content) and sent_eight is to_eight
    # the caller's message keeps its content and learns the pushed message's id
    assert not transport.is_packed(to_seven.content)
    assert to_seven.metadata.message_id == sent_seven.metadata.message_id
    # a packed reply reaches the strategy unpacked
    inner.replies = [_reply(7, transport.pack(_content(seed=3)))]
    (reply,) = grid.pull_messages(["x"])
    assert reply.content["arrays"].object_id == _content(seed=3)["arrays"].object_id


def test_without_pack_the_grid_sends_every_message_as_it_is() -> None:
    inner = _RecordingGrid()
    grid = PollingGrid(inner)  # type: ignore[arg-type]
    grid.packing_nodes.add(7)
    msg = Message(content=_content(), dst_node_id=7, message_type="train")
    grid.push_messages([msg])
    assert inner.pushed[-1] is msg


def test_a_reply_packed_whole_is_three_objects_and_every_record_comes_back() -> None:
    content = _content()
    content["fedforget"] = ConfigRecord({protocol.CLIENT_ID: "client-002"})
    whole = transport.pack(content, whole=True)
    assert list(whole) == [transport.WHOLE_KEY]
    # Message, RecordDict and the one ConfigRecord; unpacked: Message, RecordDict, four
    # records and two objects for each of the four arrays: 2 + 4 + 8 = 14
    reply = Message(content=whole, dst_node_id=3, message_type="train")
    assert len(get_all_nested_objects(reply)) == 3
    assert len(get_all_nested_objects(Message(content=content, dst_node_id=3,
                                              message_type="train"))) == 14
    back = transport.unpack(whole)
    assert list(back) == list(content)
    for key in content:
        assert type(back[key]) is type(content[key])
        assert back[key].object_id == content[key].object_id


def test_whole_packing_keeps_to_its_limit_and_refuses_a_damaged_blob(
        monkeypatch: pytest.MonkeyPatch) -> None:
    content = _content()
    monkeypatch.setenv("FEDFORGET_PACK_WHOLE_LIMIT", "1")
    packed = transport.pack(content, whole=True)  # too large: the arrays alone
    assert list(packed) == [transport.PACKED_PREFIX + "arrays", "config", "metrics"]
    monkeypatch.delenv("FEDFORGET_PACK_WHOLE_LIMIT")
    whole = transport.pack(content, whole=True)
    whole[transport.WHOLE_KEY]["blobs"] = [b"\xff\x00garbage"] * 3
    with pytest.raises(ValueError, match="'fedforget.packed-content' is malformed"):
        transport.unpack(whole)


def test_a_reply_the_server_cannot_unpack_fails_that_reply_only() -> None:
    # a node sends a damaged packed reply: it reaches the strategy as an error reply that
    # names the node, and the other reply comes through
    inner = _RecordingGrid()
    grid = PollingGrid(inner, pack=True)  # type: ignore[arg-type]
    bad = transport.pack(_content(), whole=True)
    bad[transport.WHOLE_KEY]["blobs"] = [b"\x00"]
    good = Message(content=transport.pack(_content(seed=4)), dst_node_id=1, message_type="train")
    bad_reply = Message(content=bad, dst_node_id=1, message_type="train")
    bad_reply.metadata.__dict__["_src_node_id"] = 9
    inner.replies = [bad_reply, good]
    first, second = grid.pull_messages(["x"])
    assert first.has_error() and "fedforget: error: the reply of node 9" in first.error.reason
    assert second.content["arrays"].object_id == _content(seed=4)["arrays"].object_id

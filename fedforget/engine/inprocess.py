"""The in-process engine: a Flower ``Grid`` that calls the ClientApp directly.

It runs the very same ``ServerApp`` and ``ClientApp`` as Flower's simulation and
deployment engines, synchronously, in one process, with none of Ray's fixed cost: for
tests and for large experiment grids. Node ids are random 64-bit numbers, as in Flower,
so nothing may depend on them; clients are told their ``partition-id`` through the node
config, as the simulation engine does.
"""

from __future__ import annotations

import logging
import secrets
import traceback
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID
CLIENT_APP_EXCEPTION = 3  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp instances called in this process.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of nodes; node ``i`` gets ``partition-id = i``.
    run_config : Mapping
        The run config, given to every node's ``Context``.
    node_configs : list of Mapping, optional
        Extra node config per node (merged over ``partition-id``/``num-partitions``).
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_config: Mapping[str, Any],
        node_configs: list[Mapping[str, Any]] | None = None,
        run_id: int | None = None,
    ) -> None:
        self._client_app = client_app
        self._run = Run.create_empty(run_id if run_id is not None else secrets.randbits(63))
        self._contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            node_id = secrets.randbits(63) | 2  # never SUPERLINK_NODE_ID
            node_config: dict[str, Any] = {"partition-id": i, "num-partitions": num_nodes}
            if node_configs is not None:
                node_config.update(node_configs[i])
            self._contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the reply."""
        ids: list[str] = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            context = self._contexts.get(msg.metadata.dst_node_id)
            if context is None:
                raise ValueError(f"no node with id {msg.metadata.dst_node_id} in this grid")
            self.messages_sent += 1
            try:
                reply = self._client_app(msg, context)
            except Exception as exc:  # a failing client must not stop the server
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                reply = Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=msg)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages and return every reply (synchronously)."""
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_nodes: int,
    run_config: Mapping[str, Any],
    node_configs: list[Mapping[str, Any]] | None = None,
    verbose: bool = False,
) -> InProcessGrid:
    """Run ``server_app`` against ``num_nodes`` in-process ClientApps; return the grid."""
    grid = InProcessGrid(
        client_app, num_nodes=num_nodes, run_config=run_config, node_configs=node_configs
    )
    # Messages are stamped with the identity of the task that creates them; Flower's
    # runtime sets it per process, so do the same here.
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    context = Context(
        run_id=grid.run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if not verbose:  # Flower logs every round at INFO; fedforget shows its own progress
        flwr_logger.setLevel(logging.WARNING)
    try:
        server_app(grid, context)
    finally:
        flwr_logger.setLevel(previous)
    return grid

"""A Grid view that waits for replies with a short, growing poll instead of Flower's 3 s.

Flower 1.42's deployment Grid (``flwr.superlink.grid.http_grid.HttpGrid``, what a
ServerApp gets under a SuperLink) implements ``send_and_receive`` as: push, then pull the
replies, and ``time.sleep(3)`` between two pulls. Any round whose replies are not there at
the first pull (i.e. every round) therefore lasts at least 3 s. :class:`PollingGrid` pushes
and pulls with the Grid's own public ``push_messages``/``pull_messages`` and waits
``initial_interval`` after the first empty pull, growing by ``growth`` per empty pull up to
``max_interval``: fast rounds are seen within milliseconds, slow ones cost a few requests.
``timeout`` has Flower's meaning (None: wait for every reply; else return the replies that
came in time).

:func:`fast_polling` wraps the deployment Grid and the simulation's ``InMemoryGrid``
(``flwr.superlink.grid.inmemory_grid``, which sleeps a fixed 0.1 s between two pulls, so
that every simulated round ended on a 100 ms step); fedforget's in-process Grid, which
answers synchronously, is returned unchanged. The deployment Grid's wrapper also packs the
arrays it sends to nodes that unpack them (:mod:`fedforget.transport`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedforget import protocol, transport

__all__ = ["PollingGrid", "fast_polling"]

log = logging.getLogger("fedforget.grid")


class PollingGrid(Grid):
    """``grid`` with a ``send_and_receive`` that polls for replies with a growing interval.

    Parameters
    ----------
    grid : Grid
        The Grid to wrap; every other call goes to it unchanged.
    initial_interval, max_interval : float
        Seconds to wait after the first empty pull, and at most.
    growth : float
        Factor by which the wait grows after each empty pull (≥ 1).
    pack : bool
        Send the arrays of messages to nodes that can unpack them packed
        (:mod:`fedforget.transport`: fewer objects per message); replies are unpacked
        either way. The deployment Grid's wrapper packs.
    """

    def __init__(self, grid: Grid, *, initial_interval: float = 0.005,
                 max_interval: float = 0.1, growth: float = 1.5, pack: bool = False) -> None:
        if not 0 < initial_interval <= max_interval:
            raise ValueError(f"initial_interval = {initial_interval}, max_interval = "
                             f"{max_interval}: expected 0 < initial <= max")
        if growth < 1:
            raise ValueError(f"growth = {growth}: expected at least 1")
        self.grid = grid
        self.initial_interval = initial_interval
        self.max_interval = max_interval
        self.growth = growth
        self.pack = pack
        self.packing_nodes: set[int] = set()
        """Nodes whose identify reply said they unpack packed arrays."""

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # noqa: D102
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        if not self.pack or not self.packing_nodes:
            return self.grid.push_messages(messages)
        return self.grid.push_messages([self._packed(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        replies = list(self.grid.pull_messages(message_ids))
        for i, reply in enumerate(replies):
            if not reply.has_content():
                continue
            if transport.is_packed(reply.content):
                try:
                    reply.content = transport.unpack(reply.content)
                except ValueError as exc:  # a node's bad reply fails that reply, not the run
                    reason = (f"fedforget: error: the reply of node "
                              f"{reply.metadata.src_node_id} is not a packed content this "
                              f"server can read: {exc}")
                    log.warning(reason)
                    replies[i] = make_message(
                        metadata=reply.metadata, error=Error(code=0, reason=reason))
                    continue
            record = reply.content.get(protocol.CLIENT_RECORD)
            if isinstance(record, ConfigRecord) and record.get(protocol.PACKING) is True:
                self.packing_nodes.add(reply.metadata.src_node_id)
        return replies

    def _packed(self, message: Message) -> Message:
        """``message`` with its arrays packed if its node unpacks them (a copy sharing the
        metadata, so the caller's message gets the pushed message's id; its content is
        left as it was)."""
        if (message.metadata.dst_node_id not in self.packing_nodes
                or not message.has_content()):
            return message
        content = transport.pack(message.content)
        if content is message.content:
            return message
        return make_message(metadata=message.metadata, content=content)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull replies until all came or ``timeout`` seconds passed."""
        t0 = time.monotonic()
        pending = set(self.push_messages(messages))
        t1 = time.monotonic()
        n = len(pending)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.initial_interval
        while pending:
            got = list(self.pull_messages(list(pending)))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(wait, left))
            else:
                time.sleep(wait)
            wait = wait if got else min(self.max_interval, wait * self.growth)
        log.debug("pushed %d messages in %.3f s; %d replies after %.3f s", n, t1 - t0,
                  len(replies), time.monotonic() - t1)
        return replies


def fast_polling(grid: Grid) -> Grid:
    """``grid`` wrapped in a :class:`PollingGrid` if it is Flower's deployment Grid or the
    simulation's ``InMemoryGrid``.

    For the deployment Grid also, in this process (a ServerApp under a SuperLink runs in its own
    ``flwr-serverapp`` process): a reply whose objects are not all at the SuperLink yet —
    the SuperLink lists a reply as soon as its message is pushed, before its arrays, and a
    fast poll sees it in between — is pulled again after 5 ms (growing, at most 0.25 s)
    instead of Flower's 1 s, 2 s, 4 s, ... (``pull_objects``' ``initial_backoff``).
    """
    if isinstance(grid, PollingGrid):
        return grid
    if not any(c.__module__.startswith("flwr.superlink.grid.") for c in type(grid).__mro__):
        # neither Flower grid (the in-process one, a user's own): importing Flower's grid
        # package (about a second: the SuperLink's dependencies) would buy nothing
        return grid
    try:
        from flwr.superlink.grid import http_grid
    except ImportError:  # another Flower layout: keep its own polling
        return grid
    if not isinstance(grid, http_grid.HttpGrid):
        try:
            from flwr.superlink.grid.inmemory_grid import InMemoryGrid
        except ImportError:  # pragma: no cover - another Flower layout
            return grid
        return PollingGrid(grid) if isinstance(grid, InMemoryGrid) else grid
    pull = getattr(http_grid, "pull_objects", None)
    if pull is not None and not isinstance(pull, functools.partial) and (
            "initial_backoff" in inspect.signature(pull).parameters):
        http_grid.pull_objects = functools.partial(
            pull, initial_backoff=0.005, backoff_cap=0.25)
    return PollingGrid(grid, pack=True)

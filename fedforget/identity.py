"""Which node may speak for which client: client ids pinned to authenticated node ids.

A client's stable id is what its node *says* (node config ``client-id``, else
``partition-id``): anyone who runs a SuperNode with the same node config claims the same
id. What the server can trust depends on the SuperLink:

* **With SuperNode authentication** (``flower-superlink --enable-supernode-auth``, node keys
  registered with ``flwr supernode register``) a node id is bound to the registered key
  that authenticated it, and stays the same when the node restarts. fedforget then *pins*
  each client id to the first node id that claims it (``fedforget.node-auth = true``): the
  pin is kept in the run directory (``nodes.json``) and any other node that claims that
  client id later — in this run or any later one, whether or not the pinned node is
  connected — is refused with a logged reason, and the round goes on without it. Moving
  a client to a new key is an operator's act: remove its pin from ``nodes.json``.
* **Without authentication** node ids are random per connection, so nothing can be pinned:
  the server trusts every node that reaches the SuperLink to be the client it says it is.
  Two nodes claiming one id at the same time are still told apart — the first to answer
  is taken, the other refused — but a node claiming the id of a client that is not
  connected is accepted as that client.

Every refusal is logged and recorded in ``nodes.json`` (``refused``: node, client id,
reason, time).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedforget.errors import HistoryError
from fedforget.fileio import write_atomic
from fedforget.history.records import utc_now

log = logging.getLogger("fedforget.server")

__all__ = ["NodePins", "Refusal"]

MAX_REFUSALS_KEPT = 1000
"""The most refusals ``nodes.json`` keeps (the oldest are dropped)."""


@dataclass(frozen=True)
class Refusal:
    """A node refused as the client it claimed to be."""

    node_id: int
    client_id: str
    reason: str
    at: str = field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"node_id": self.node_id, "client_id": self.client_id, "reason": self.reason,
                "at": self.at}


class NodePins:
    """Client id -> node id pins of one run, and the refusals (see the module).

    Parameters
    ----------
    path : Path, optional
        The run's ``nodes.json``; None keeps nothing on disk.
    pin : bool
        Whether node ids are authenticated (``fedforget.node-auth``): only then are client
        ids pinned. Without, pins already recorded are shown but not enforced.
    """

    def __init__(self, path: Path | None, *, pin: bool) -> None:
        self.path = path
        self.pin = pin
        self.pins: dict[str, int] = {}
        self.refused: list[dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                self.pins = {str(k): int(v) for k, v in data.get("pins", {}).items()}
                self.refused = list(data.get("refused", []))
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise HistoryError(f"{path} is not a node-pin file fedforget wrote: {exc}"
                                   ) from None

    def check(self, client_id: str, node_id: int, claimed: dict[str, int]) -> Refusal | None:
        """Accept ``node_id`` as ``client_id`` (pinning it) or return why not.

        ``claimed`` holds the client ids already accepted in this identification.
        """
        if client_id in claimed and claimed[client_id] != node_id:
            return Refusal(node_id, client_id,
                           f"node {claimed[client_id]} already speaks for {client_id} in this "
                           "run (the first node to claim a client id is taken)")
        pinned = self.pins.get(client_id)
        if self.pin and pinned is not None and pinned != node_id:
            return Refusal(node_id, client_id,
                           f"{client_id} is pinned to node {pinned}, the authenticated key "
                           "that first claimed it")
        if self.pin and pinned is None:
            self.pins[client_id] = node_id
        return None

    def refuse(self, refusal: Refusal) -> None:
        """Log and record a refusal."""
        log.warning("node %d claims client id %r: refused, because %s; the round goes on "
                    "without it", refusal.node_id, refusal.client_id, refusal.reason)
        self.refused.append(refusal.to_dict())
        del self.refused[:-MAX_REFUSALS_KEPT]

    def save(self) -> None:
        """Write ``nodes.json`` (if there is a path)."""
        if self.path is None or not (self.pin or self.refused or self.path.exists()):
            return  # nothing to keep (no authentication, no refusal)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(
            {"node_auth": self.pin, "pins": dict(sorted(self.pins.items())),
             "refused": self.refused}, indent=2, sort_keys=True))

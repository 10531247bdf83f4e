"""What an unlearning run (or a training replay) cost, in the units the comparison uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Cost"]


@dataclass
class Cost:
    """What an unlearning run cost.

    ``client_epochs`` counts local epochs of training asked of clients (one client
    training E epochs is E); ``rounds`` counts federated rounds run; bytes are model
    payloads sent to and received from clients; ``server_seconds`` is the server's wall
    time, ``client_seconds`` the sum of the clients' reported training time.
    """

    client_epochs: float = 0.0
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    server_seconds: float = 0.0
    client_seconds: float = 0.0

    def add(self, other: Cost) -> None:
        """Accumulate ``other`` into this cost (server time excluded)."""
        self.client_epochs += other.client_epochs
        self.rounds += other.rounds
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.client_seconds += other.client_seconds

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)

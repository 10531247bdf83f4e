"""Withdrawal requests, persisted in the run's store, with a state machine.

A client asks to leave: a :class:`WithdrawalRequest` (who, when, why) is written to the
run's index (``history.sqlite``, table ``withdrawals``) and moves through

.. code-block:: text

    pending ──► unlearning ──► done
                     │
                     └──────► failed ──► unlearning (retried)

A request left in ``unlearning`` by a crash is found again on restart
(:meth:`WithdrawalLedger.interrupted`) and re-run; nothing is lost. Withdrawing the same
client twice returns the existing request. A withdrawn client is never sampled again.

Requests come at three sizes (:mod:`fedforget.erasure`): a whole client (this table,
``withdrawals``: one per client, the client is never sampled again), some records of a
client that stays, and a class across the federation (table ``erasures``: any number,
:meth:`WithdrawalLedger.request_records`, :meth:`WithdrawalLedger.request_class`). Both
kinds share the state machine and the orders; :meth:`WithdrawalLedger.scope` is everything
the record and class requests ask to forget.

Which method serves a request is an *order* on it (:meth:`WithdrawalLedger.order`: method,
parameters, time), given by ``fedforget unlearn`` (or, in a deployment, the server's
policy) before the ServerApp runs in unlearning mode; the app's unlearning service serves
the latest order (:meth:`WithdrawalLedger.latest_order`).
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedforget.erasure import ErasureScope, parse_record_ids
from fedforget.errors import FedForgetError, HistoryError
from fedforget.history.records import utc_now
from fedforget.history.store import INDEX_FILENAME

LISTED_CLIENTS = 10
"""Rosters up to this size are listed whole in an unknown-client message."""


def unknown_client_message(client_id: str, roster: Collection[str]) -> str:
    """``unknown client ...`` naming the run's clients: all of them in a small roster; in a
    large one their number, the first and last id, and the ids closest to ``client_id``
    (a typo is the usual cause), so that the message stays one readable line."""
    import difflib

    known = sorted(roster)
    if len(known) <= LISTED_CLIENTS:
        return f"unknown client {client_id!r}: this run's clients are {', '.join(known) or 'none'}"
    close = difflib.get_close_matches(client_id, known, n=3, cutoff=0.6)
    return (f"unknown client {client_id!r}: this run has {len(known)} clients, {known[0]} to "
            f"{known[-1]} in sorted order"
            + (f"; the closest ids are {', '.join(close)}" if close else ""))


STATES = ("pending", "unlearning", "done", "failed")
_TRANSITIONS = {
    "pending": {"unlearning"},
    "unlearning": {"done", "failed", "unlearning"},  # unlearning -> unlearning: re-run
    "failed": {"unlearning"},
    "done": {"unlearning"},  # a later method run on the same request
}

_COLUMNS = "request_id, client_id, received_at, reason, state, updated_at, method, detail, " \
    "params, ordered_at"

# The tables (``withdrawals``: whole clients; ``erasures``: record- and class-level
# requests, a client may make many and stays in the federation) are the history store's
# (fedforget.history.store), with the triggers that log every change in withdrawal_events.
_TABLES = ("withdrawals", "erasures")


class WithdrawalError(FedForgetError):
    """A withdrawal request cannot be made or moved as asked."""


@dataclass(frozen=True)
class WithdrawalRequest:
    """One client's request to leave the federation and be forgotten."""

    request_id: str
    client_id: str
    received_at: str
    reason: str
    state: str
    updated_at: str
    method: str | None = None
    detail: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    ordered_at: str | None = None
    kind: str = "client"  # "client", "records" or "class" (fedforget.erasure.KINDS)
    scope: dict[str, Any] | None = None  # {"records": [ids]} or {"labels": [labels]}

    @property
    def record_ids(self) -> tuple[str, ...]:
        """The record ids a ``records`` request names (empty for another kind)."""
        return tuple((self.scope or {}).get("records", ()))

    @property
    def labels(self) -> tuple[int, ...]:
        """The labels a ``class`` request names (empty for another kind)."""
        return tuple(int(v) for v in (self.scope or {}).get("labels", ()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "kind": self.kind,
            "scope": self.scope,
            "request_id": self.request_id,
            "client_id": self.client_id,
            "received_at": self.received_at,
            "reason": self.reason,
            "state": self.state,
            "updated_at": self.updated_at,
            "method": self.method,
            "detail": self.detail,
            "params": self.params,
            "ordered_at": self.ordered_at,
        }


class WithdrawalLedger:
    """The withdrawal requests of one run directory."""

    def __init__(self, directory: str | Path) -> None:
        index = Path(directory) / INDEX_FILENAME
        if not index.is_file():
            raise HistoryError(f"{directory} is not a run directory: {index} is missing")
        uri = f"file:{urllib.parse.quote(str(index))}?mode=rw"
        self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA synchronous=FULL")
        tables = {row[0] for row in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in _TABLES if t not in tables]
        if missing:
            self._conn.close()
            raise HistoryError(f"{index} has no {' or '.join(missing)} table: it is not the "
                               "index of a fedforget history (format 3)")
        self.directory = Path(directory)

    def close(self) -> None:
        """Close the index connection."""
        self._conn.close()

    def __enter__(self) -> WithdrawalLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- queries
    def _row(self, where: str, value: str, table: str = "withdrawals"
             ) -> WithdrawalRequest | None:
        extra = ", kind, scope" if table == "erasures" else ""
        row = self._conn.execute(
            f"SELECT {_COLUMNS}{extra} FROM {table} WHERE {where} = ?", (value,)
        ).fetchone()
        if row is None:
            return None
        return WithdrawalRequest(
            request_id=row[0], client_id=row[1], received_at=row[2], reason=row[3],
            state=row[4], updated_at=row[5], method=row[6],
            detail=json.loads(row[7]) if row[7] else None,
            params=json.loads(row[8]) if row[8] else None, ordered_at=row[9],
            kind=row[10] if extra else "client",
            scope=json.loads(row[11]) if extra else None,
        )

    def _table_of(self, request_id: str) -> str:
        for table in _TABLES:
            if self._conn.execute(f"SELECT 1 FROM {table} WHERE request_id = ?",
                                  (request_id,)).fetchone():
                return table
        raise WithdrawalError(f"no withdrawal request {request_id!r} in {self.directory}")

    def get(self, request_id: str) -> WithdrawalRequest:
        """The request ``request_id`` (of any kind); WithdrawalError if there is none."""
        found = self._row("request_id", request_id, self._table_of(request_id))
        assert found is not None
        return found

    def for_client(self, client_id: str) -> WithdrawalRequest | None:
        """The request of ``client_id``, if it made one."""
        return self._row("client_id", client_id)

    def all(self) -> list[WithdrawalRequest]:
        """Every request of every kind, oldest first."""
        ids = [r[0] for r in self._conn.execute(
            "SELECT request_id, received_at FROM withdrawals UNION ALL "
            "SELECT request_id, received_at FROM erasures ORDER BY 2, 1")]
        return [self.get(i) for i in ids]

    def erasures(self) -> list[WithdrawalRequest]:
        """The record- and class-level requests, oldest first."""
        return [r for r in self.all() if r.kind != "client"]

    def scope(self) -> ErasureScope:
        """Everything the record- and class-level requests ask to forget (any state: a
        request is in force from the moment it is recorded)."""
        records: dict[str, frozenset[str]] = {}
        labels: set[int] = set()
        for request in self.erasures():
            if request.kind == "records":
                records[request.client_id] = (records.get(request.client_id, frozenset())
                                              | frozenset(request.record_ids))
            else:
                labels.update(request.labels)
        return ErasureScope(records=records, labels=frozenset(labels))

    def withdrawn(self) -> frozenset[str]:
        """Every client that asked to leave (never to be sampled again)."""
        return frozenset(r[0] for r in self._conn.execute("SELECT client_id FROM withdrawals"))

    def interrupted(self) -> list[WithdrawalRequest]:
        """Requests a crash left in ``unlearning``: to be re-run."""
        return [r for r in self.all() if r.state == "unlearning"]

    def latest_order(self) -> WithdrawalRequest:
        """The request most recently ordered to be served (:meth:`order`)."""
        row = self._conn.execute(
            "SELECT request_id, ordered_at FROM withdrawals WHERE ordered_at IS NOT NULL "
            "UNION ALL SELECT request_id, ordered_at FROM erasures WHERE ordered_at IS NOT "
            "NULL ORDER BY 2 DESC, 1 DESC LIMIT 1").fetchone()
        if row is None:
            raise WithdrawalError(
                f"no withdrawal request in {self.directory} has been ordered to be served; "
                "order one with `fedforget unlearn DIR --client ID --method NAME`"
            )
        return self.get(row[0])

    def order(self, request_id: str, *, method: str, params: dict[str, Any]) -> WithdrawalRequest:
        """Order request ``request_id`` to be served by ``method`` with ``params``."""
        table = self._table_of(request_id)
        self._conn.execute(
            f"UPDATE {table} SET method = ?, params = ?, ordered_at = ? WHERE request_id = ?",
            (method, json.dumps(params, sort_keys=True), utc_now(), request_id),
        )
        return self.get(request_id)

    # ----------------------------------------------------------------- changes
    def request(
        self, client_id: str, *, reason: str, roster: set[str] | frozenset[str]
    ) -> tuple[WithdrawalRequest, bool]:
        """Record that ``client_id`` withdraws; return (request, created).

        A second request for the same client returns the first one (created = False).
        A client not in ``roster`` (the clients of this run) is refused.
        """
        if client_id not in roster:
            raise WithdrawalError(unknown_client_message(client_id, roster))
        existing = self.for_client(client_id)
        if existing is not None:
            return existing, False
        now = utc_now()
        request = WithdrawalRequest(
            request_id=f"wr-{uuid.uuid4().hex[:12]}",
            client_id=client_id,
            received_at=now,
            reason=reason,
            state="pending",
            updated_at=now,
        )
        self._conn.execute(
            "INSERT INTO withdrawals (request_id, client_id, received_at, reason, state, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (request.request_id, client_id, now, reason, "pending", now),
        )
        return request, True

    def request_records(
        self, client_id: str, record_ids: Collection[str], *, reason: str,
        roster: set[str] | frozenset[str],
    ) -> WithdrawalRequest:
        """Record that ``client_id`` asks to have ``record_ids`` forgotten; it stays.

        Each call is a new request (a client may ask several times). A client not in
        ``roster``, or one that withdrew (its records are forgotten with it), is refused.
        """
        if client_id not in roster:
            raise WithdrawalError(unknown_client_message(client_id, roster))
        if self.for_client(client_id) is not None:
            raise WithdrawalError(
                f"client {client_id!r} has withdrawn: every record of it is forgotten with "
                "it; expected a client that stays in the federation"
            )
        ids = parse_record_ids(record_ids)
        return self._new_erasure("records", client_id, {"records": ids}, reason)

    def request_class(self, labels: Collection[int], *, requester: str, reason: str,
                      num_classes: int | None = None) -> WithdrawalRequest:
        """Record that the federation forgets every example of ``labels``.

        ``requester`` names who asked (the operator, a policy): it takes the place of the
        client in the receipt's commitment. Labels outside ``0..num_classes-1`` (when
        known) are refused.
        """
        chosen = sorted({int(v) for v in labels})
        if not chosen or any(v < 0 or (num_classes is not None and v >= num_classes)
                             for v in chosen):
            top = "" if num_classes is None else f" in 0..{num_classes - 1}"
            raise WithdrawalError(f"labels {list(labels)!r}: expected one or more integers"
                                  f"{top}")
        if not isinstance(requester, str) or not requester:
            raise WithdrawalError(f"requester {requester!r}: expected a non-empty name")
        return self._new_erasure("class", requester, {"labels": chosen}, reason)

    def _new_erasure(self, kind: str, client_id: str, scope: dict[str, Any],
                     reason: str) -> WithdrawalRequest:
        now = utc_now()
        request_id = f"er-{uuid.uuid4().hex[:12]}"
        self._conn.execute(
            "INSERT INTO erasures (request_id, kind, client_id, scope, received_at, reason, "
            "state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, kind, client_id, json.dumps(scope, sort_keys=True), now, reason,
             "pending", now),
        )
        return self.get(request_id)

    def move(
        self,
        request_id: str,
        state: str,
        *,
        method: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> WithdrawalRequest:
        """Move a request to ``state`` (only along the state machine's edges)."""
        current = self.get(request_id)
        if state not in STATES:
            raise WithdrawalError(f"state {state!r}; expected one of {', '.join(STATES)}")
        if state not in _TRANSITIONS[current.state]:
            raise WithdrawalError(
                f"request {request_id} is {current.state!r}; it cannot move to {state!r}"
            )
        self._conn.execute(
            f"UPDATE {self._table_of(request_id)} SET state = ?, updated_at = ?, "
            "method = COALESCE(?, method), detail = ? WHERE request_id = ?",
            (state, utc_now(), method, json.dumps(detail, sort_keys=True) if detail else None,
             request_id),
        )
        return self.get(request_id)

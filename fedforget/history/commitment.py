"""What a signed tree head commits to, computed from a history index; heads compared.

A version 2 tree head (:mod:`fedforget.receipts.tree_head`) signs two RFC 9162 Merkle trees
of the store:

* the **round tree**: leaf ``t - 1`` is the canonical record of round ``t``
  (:meth:`~fedforget.history.records.RoundRecord.canonical_bytes`, the bytes in the
  ``rounds.record`` column), which carries the round's participants, weights, example
  counts, update digests, refused replies, config, and the digest of the run context;
* the **ledger tree**: leaf ``seq - 1`` is event ``seq`` of the withdrawal log (the table
  ``withdrawal_events``, appended by SQLite triggers on every insert into and update of
  ``withdrawals``), as the RFC 8785 canonical JSON of :func:`ledger_event_bytes`.

:func:`compare_heads` recomputes both trees from an index and names, for every signed head it
cannot reproduce, the round or the withdrawal event that was dropped or rewritten, and any
two heads that sign different roots for the same size (a forked log).

Everything here reads through a given :class:`sqlite3.Connection` and never writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedforget.canonical import canonical_dumps
from fedforget.errors import HistoryError
from fedforget.fileio import storage_error
from fedforget.receipts.errors import ReceiptError
from fedforget.receipts.merkle import MerkleAccumulator
from fedforget.receipts.tree_head import TreeHead

__all__ = [
    "LEDGER_EVENT_FORMAT",
    "Commitment",
    "LoggedHead",
    "commitment_of",
    "compare_heads",
    "ledger_event_bytes",
    "ledger_leaves",
    "read_head_log",
    "round_leaves",
    "spans",
]

LEDGER_EVENT_FORMAT = "fedforget-withdrawal-event/v1"
"""Value of ``format`` in every ledger event."""

_EVENT_COLUMNS = ("seq", "request_id", "client_id", "received_at", "reason", "state",
                  "updated_at", "method", "detail", "params", "ordered_at", "kind", "scope")


def ledger_event_bytes(row: Sequence[Any]) -> bytes:
    """The canonical bytes of one withdrawal event, ``row`` in the column order
    ``seq, request_id, client_id, received_at, reason, state, updated_at, method, detail,
    params, ordered_at, kind, scope`` (``kind``: ``client`` for a whole client's withdrawal,
    ``records`` or ``class`` for an erasure, whose ``scope`` is the JSON of its record ids
    or labels).

    .. code-block:: json

        {"client-id": "client-003", "detail": null, "format": "fedforget-withdrawal-event/v1",
         "kind": "client", "method": null, "ordered-at": null, "params": null, "reason": "",
         "received-at": "2025-01-31T12:00:00.000001Z", "request-id": "wr-0123456789ab",
         "scope": null, "seq": 1, "state": "pending",
         "updated-at": "2025-01-31T12:00:00.000001Z"}

    ``detail`` and ``params`` are the JSON texts stored in the ledger, as strings.

    Raises
    ------
    HistoryError
        If a value is not of the column's type.
    """
    if len(row) != len(_EVENT_COLUMNS):
        raise HistoryError(
            f"a withdrawal event has {len(row)} columns; expected {len(_EVENT_COLUMNS)}")
    (seq, request_id, client_id, received_at, reason, state, updated_at, method, detail,
     params, ordered_at, kind, scope) = row
    for name, value, nullable in (
        ("request_id", request_id, False), ("client_id", client_id, False),
        ("received_at", received_at, False), ("reason", reason, False),
        ("state", state, False), ("updated_at", updated_at, False),
        ("method", method, True), ("detail", detail, True), ("params", params, True),
        ("ordered_at", ordered_at, True), ("kind", kind, False), ("scope", scope, True),
    ):
        if not (isinstance(value, str) or (nullable and value is None)):
            raise HistoryError(
                f"withdrawal event {seq!r} has {name} {value!r}; expected text"
                + (" or NULL" if nullable else "")
            )
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise HistoryError(f"withdrawal event seq is {seq!r}; expected an integer")
    try:
        return canonical_dumps({
            "format": LEDGER_EVENT_FORMAT,
            "seq": seq,
            "request-id": request_id,
            "client-id": client_id,
            "received-at": received_at,
            "reason": reason,
            "state": state,
            "updated-at": updated_at,
            "method": method,
            "detail": detail,
            "params": params,
            "ordered-at": ordered_at,
            "kind": kind,
            "scope": scope,
        })
    except ValueError as exc:
        raise HistoryError(f"withdrawal event {seq} cannot be written as JSON: {exc}") from exc


def round_leaves(conn: sqlite3.Connection) -> Iterator[tuple[int, bytes]]:
    """``(round, record bytes)`` of every round, in round order (the round tree's leaves;
    none when the index has no rounds table, as a log damaged from its first frames)."""
    if not _has_table(conn, "rounds"):
        return
    cursor = conn.execute("SELECT round, record FROM rounds ORDER BY round")
    try:
        for t, record in cursor:
            yield int(t), record if isinstance(record, bytes) else str(record).encode("utf-8")
    finally:
        cursor.close()


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone() is not None


def ledger_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """Every withdrawal event row, in ``seq`` order (none if the table is absent)."""
    if not _has_table(conn, "withdrawal_events"):
        return []
    return conn.execute(
        f"SELECT {', '.join(_EVENT_COLUMNS)} FROM withdrawal_events ORDER BY seq"
    ).fetchall()


def ledger_leaves(conn: sqlite3.Connection) -> Iterator[tuple[int, bytes]]:
    """``(seq, event bytes)`` of every withdrawal event, in order (the ledger's leaves)."""
    for row in ledger_rows(conn):
        yield int(row[0]), ledger_event_bytes(row)


@dataclass(frozen=True, slots=True)
class Commitment:
    """Sizes and roots of a store's two trees.

    Attributes
    ----------
    size, root
        Rounds and the MTH of their records.
    ledger_size, ledger_root
        Withdrawal events and the MTH of their bytes.
    """

    size: int
    root: bytes
    ledger_size: int
    ledger_root: bytes

    def matches(self, head: TreeHead) -> bool:
        """Whether ``head`` signs exactly this commitment."""
        return (head.size, head.root, head.ledger_size, head.ledger_root) == (
            self.size, self.root.hex(), self.ledger_size, self.ledger_root.hex()
        )


def commitment_of(conn: sqlite3.Connection) -> Commitment:
    """The commitment of the store behind ``conn`` (streamed: O(log n) memory)."""
    rounds = MerkleAccumulator()
    for _, record in round_leaves(conn):
        rounds.append(record)
    ledger = MerkleAccumulator()
    for _, event in ledger_leaves(conn):
        ledger.append(event)
    return Commitment(rounds.size, rounds.root(), ledger.size, ledger.root())


@dataclass(frozen=True, slots=True)
class LoggedHead:
    """A tree head and where it was read (``"tree_heads.jsonl line 4"``)."""

    head: TreeHead
    where: str


def read_head_log(path: str | Path) -> tuple[list[LoggedHead], list[str]]:
    """The heads of a head log (one canonical JSON head per line) and the problems found.

    Every line must end with a newline and hold the canonical JSON of a version 2 head; a
    line that does not is reported by number (its signature is not checked here). A missing
    file has no heads and no problems.

    Raises
    ------
    StorageError
        If the file exists but cannot be read.
    """
    log = Path(path)
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise storage_error(exc, log, "read") from exc
    heads: list[LoggedHead] = []
    problems: list[str] = []
    if data and not data.endswith(b"\n"):
        problems.append(f"{log}: the last line does not end with a newline (truncated or "
                        "altered)")
    for number, line in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n")
                                  else data.split(b"\n"), start=1):
        where = f"{log.name} line {number}"
        try:
            head = TreeHead.from_json(line)
        except ReceiptError as exc:
            problems.append(f"{log} line {number}: not a tree head: {exc}")
            continue
        if head.to_json() != line + b"\n":
            problems.append(f"{log} line {number}: not the canonical JSON of its head "
                            "(altered)")
            continue
        heads.append(LoggedHead(head, where))
    return heads, problems


def spans(numbers: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    values = sorted(set(numbers))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def _compare_tree(
    leaves: Iterable[bytes],
    heads: Sequence[LoggedHead],
    *,
    size_of: Any,
    root_of: Any,
    item: str,
    label: Any,
) -> list[str]:
    """Problems of one tree: forks, heads beyond the store, the first rewritten leaf."""
    problems: list[str] = []
    by_size: dict[int, list[LoggedHead]] = {}
    for h in heads:
        by_size.setdefault(size_of(h.head), []).append(h)
    for size, group in sorted(by_size.items()):
        roots = {root_of(h.head) for h in group}
        if len(roots) > 1:
            places = ", ".join(h.where for h in group)
            problems.append(
                f"forked log: {places} sign {len(roots)} different {item} roots for the same "
                f"size {size}; a log never has two roots for one size"
            )
    acc = MerkleAccumulator()
    roots_at: dict[int, str] = {0: acc.root().hex()}
    wanted = set(by_size)
    for leaf in leaves:
        acc.append(leaf)
        if acc.size in wanted:
            roots_at[acc.size] = acc.root().hex()
    n = acc.size
    matched = 0
    first_bad: tuple[int, LoggedHead] | None = None
    for size in sorted(by_size):
        if size > n:
            continue
        group = by_size[size]
        if all(root_of(h.head) == roots_at[size] for h in group):
            if first_bad is None:
                matched = size
            continue
        if first_bad is None:
            first_bad = (size, next(h for h in group if root_of(h.head) != roots_at[size]))
    if first_bad is not None:
        size, h = first_bad
        if size == matched + 1:
            what = f"{item} {label(size)} differs from what {h.where} signed"
        else:
            what = (f"one of {item}s {label(matched + 1)}..{label(size)} differs from what "
                    f"{h.where} signed")
        later = sum(1 for s in by_size if matched < s <= n) - 1
        problems.append(
            f"{what} (signed {h.head.timestamp}, size {size}); it was rewritten or "
            f"replaced{'' if matched == 0 else f' (the head of size {matched} still matches)'}"
            + (f"; {later} later head(s) mismatch too" if later > 0 else "")
        )
    beyond = [h for size in sorted(by_size) if size > n for h in by_size[size]]
    if beyond:
        top = max(beyond, key=lambda h: size_of(h.head))
        top_size = size_of(top.head)
        which = (f"{item} {label(n + 1)} was" if top_size == n + 1
                 else f"{item}s {label(n + 1)}..{label(top_size)} were")
        problems.append(
            f"{which} committed and signed ({top.where}: size {top_size}, signed "
            f"{top.head.timestamp}) but the store holds {n}: dropped"
        )
    return problems


def compare_heads(conn: sqlite3.Connection, heads: Sequence[LoggedHead]) -> list[str]:
    """Compare the store behind ``conn`` with signed heads (signatures checked elsewhere).

    Returns one problem per finding, naming the round (or withdrawal event) and the head:
    two heads with different roots for one size; a round (event) that differs from what a
    head signed (the first such, from the largest head that still matches); rounds (events)
    that a head covers but the store no longer holds.
    """
    if not heads:
        return []
    rounds = _compare_tree(
        (record for _, record in round_leaves(conn)), heads,
        size_of=lambda h: h.size, root_of=lambda h: h.root, item="round",
        label=lambda i: str(i),
    )
    events = ledger_rows(conn)

    def event_label(seq: int) -> str:
        if 1 <= seq <= len(events):
            row = events[seq - 1]
            return f"{seq} (request {row[1]} of {row[2]}, {row[5]})"
        return str(seq)

    ledger = _compare_tree(
        (ledger_event_bytes(row) for row in events), heads,
        size_of=lambda h: h.ledger_size, root_of=lambda h: h.ledger_root,
        item="withdrawal event", label=event_label,
    )
    return rounds + ledger

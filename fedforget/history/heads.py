"""The server's log of signed tree heads: refuse to go on past a head the store cannot
reproduce, and never sign two roots for one size.

A signed head is a promise: "my history of ``size`` rounds has this root, my withdrawal
ledger of ``ledger-size`` events that one". If the store later reads as shorter (a damaged
write-ahead log, rows deleted) or different (a rewritten round), a server that resumed and
signed again would hand out a second root for a size it already signed: a forked log,
evidence that one of the two was false. So:

* :func:`check_resume` is called before a run resumes or signs anything: it verifies every
  head in ``tree_heads.jsonl`` and raises :class:`ForkedHistoryError`, naming the rounds or
  events, when the store does not reproduce one of them;
* :func:`refuse_second_root` is the guard every signature passes: a head whose size (or
  ledger size) was signed before with another root is refused;
* :class:`HeadLog` does both, signs a head after each committed round and after each ledger
  change, appends it to the log (flock'ed, fsync'ed; a head equal to the last one is not
  signed again, so a resume adds no duplicate), and hands the latest one to clients. It is
  a drop-in for the server's former ``HeadSigner`` (same ``on_commit``, ``config``,
  ``latest``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedforget.errors import IntegrityError
from fedforget.fileio import guard_storage
from fedforget.history.commitment import (
    Commitment,
    LoggedHead,
    ledger_leaves,
    read_head_log,
)
from fedforget.history.records import RoundRecord
from fedforget.history.store import INDEX_FILENAME, HistoryStore
from fedforget.protocol import TREE_HEAD
from fedforget.receipts.errors import ReceiptError
from fedforget.receipts.manifest import KeyManifest
from fedforget.receipts.merkle import MerkleAccumulator
from fedforget.receipts.tree_head import TreeHead, sign_tree_head, verify_tree_head
from fedforget.rundir import RunDirectory

__all__ = ["ForkedHistoryError", "HeadLog", "check_resume", "refuse_second_root"]


class ForkedHistoryError(IntegrityError):
    """The store cannot reproduce a head the server signed, or a signature would fork the
    log (a second root for a size already signed). The message names rounds and heads."""


def _verify_all(heads: Sequence[LoggedHead], public_key: Ed25519PublicKey | None,
                manifest: KeyManifest | None, path: Path) -> list[str]:
    problems: list[str] = []
    if public_key is None and manifest is None:
        return problems
    for item in heads:
        try:
            verify_tree_head(item.head, public_key=None if manifest else public_key,
                             manifest=manifest, what=item.where)
        except ReceiptError as exc:
            problems.append(f"{path}: {item.where}: {exc}")
    return problems


def check_resume(
    store: HistoryStore,
    *,
    public_key: Ed25519PublicKey | None = None,
    manifest: KeyManifest | None = None,
    heads_path: str | os.PathLike[str] | None = None,
) -> Commitment:
    """Refuse to resume (or sign) past a signed head the store cannot reproduce.

    Call it before a run resumes training, and before a server signs anything for a store
    it opened (``HeadLog`` does). Every head of ``tree_heads.jsonl`` must be well formed,
    verify under ``public_key`` (or ``manifest``; neither: signatures are not checked), and
    be reproduced by the store: its first ``size`` records hash to its root and its first
    ``ledger-size`` withdrawal events to its ledger root.

    Parameters
    ----------
    store
        The open store.
    public_key, manifest
        What the heads are checked with (the run key's public half, or its manifest after a
        rotation).
    heads_path
        The head log (default: ``tree_heads.jsonl`` of the store's directory).

    Returns
    -------
    Commitment
        What the store commits to now (sizes and roots of its two trees).

    Raises
    ------
    ForkedHistoryError
        Naming the dropped or rewritten rounds (events) and the heads that signed them, or
        the lines of the log that are damaged.
    """
    path = Path(heads_path) if heads_path is not None else RunDirectory(store.directory).tree_heads
    logged, problems = read_head_log(path)
    problems += _verify_all(logged, public_key, manifest, path)
    problems += store.head_problems(logged)
    if problems:
        listed = "\n  ".join(problems)
        raise ForkedHistoryError(
            f"refusing to go on with the history in {store.directory}: it does not reproduce "
            f"what the server signed in {path}:\n  {listed}\nResuming would sign a second "
            "root for a size already signed. Restore the store (history.sqlite and its -wal) "
            "from a backup, or train into a new directory; `fedforget history verify` shows "
            "every problem."
        )
    return store.commitment()


def refuse_second_root(heads: Sequence[LoggedHead], new: Commitment, path: Path) -> None:
    """Refuse to sign ``new`` when a head already signed the same size (or ledger size) with
    another root, or a larger size than ``new`` (the store went backwards).

    Raises
    ------
    ForkedHistoryError
        Naming the earlier head.
    """
    _SignedHeads(heads).refuse(new, path)


class _SignedHeads:
    """What a head log rules out for the next signature, kept in constant memory and
    checked in constant time (a server signs once a round: a scan of every head it signed
    before made a signature after 10,000 heads cost 1.46 ms of CPU against 0.30 ms after
    100, ``benchmarks/bench_history.py``).

    Only the heads of the largest size and of the largest ledger size are kept: a new head
    of a smaller size is refused whatever the smaller sizes signed, one of a larger size
    cannot clash with any, so a clash of roots can only be at the largest size. ``last`` is
    the log's last head. Sizes and ledger sizes are followed separately, as in the log.
    """

    __slots__ = ("last", "_top", "_top_ledger")

    def __init__(self, heads: Sequence[LoggedHead] = ()) -> None:
        self.last: LoggedHead | None = None
        self._top: list[LoggedHead] = []  # the heads of the largest size, one per root
        self._top_ledger: list[LoggedHead] = []  # of the largest ledger size, one per root
        for item in heads:
            self.add(item)

    def add(self, item: LoggedHead) -> None:
        """Take in ``item``, the head the log holds next."""
        self.last = item
        self._top = _largest(self._top, item, _tree_key)
        self._top_ledger = _largest(self._top_ledger, item, _ledger_key)

    def refuse(self, new: Commitment, path: Path) -> None:
        """Raise :class:`ForkedHistoryError` if signing ``new`` would fork the log (see
        :func:`refuse_second_root`)."""
        clash = _clash(self._top, _tree_key, new.size, new.root.hex())
        if clash is not None:
            raise ForkedHistoryError(
                f"refusing to sign root {new.root.hex()} for size {new.size}: {path} "
                f"({clash.where}) already signed root {clash.head.root} for that size"
            )
        clash = _clash(self._top_ledger, _ledger_key, new.ledger_size, new.ledger_root.hex())
        if clash is not None:
            raise ForkedHistoryError(
                f"refusing to sign ledger root {new.ledger_root.hex()} for "
                f"{new.ledger_size} withdrawal events: {path} ({clash.where}) already "
                f"signed {clash.head.ledger_root}"
            )
        for item in self._top[:1] + self._top_ledger[:1]:
            h = item.head
            if h.size > new.size or h.ledger_size > new.ledger_size:
                raise ForkedHistoryError(
                    f"refusing to sign a head of size {new.size} (ledger {new.ledger_size}): "
                    f"{path} ({item.where}) already signed size {h.size} (ledger "
                    f"{h.ledger_size}); the store lost committed rounds or withdrawal events"
                )


def _tree_key(head: TreeHead) -> tuple[int, str]:
    return head.size, head.root


def _ledger_key(head: TreeHead) -> tuple[int, str]:
    return head.ledger_size, head.ledger_root


def _largest(kept: list[LoggedHead], item: LoggedHead,
             key: Callable[[TreeHead], tuple[int, str]]) -> list[LoggedHead]:
    """``kept`` (the heads of the largest size ``key`` gives, one per root) after ``item``."""
    size, root = key(item.head)
    largest = key(kept[0].head)[0] if kept else -1
    if size > largest:
        return [item]
    if size == largest and all(key(k.head)[1] != root for k in kept):
        return [*kept, item]  # a second root for one size: only in a forked log
    return kept


def _clash(kept: list[LoggedHead], key: Callable[[TreeHead], tuple[int, str]],
           size: int, root: str) -> LoggedHead | None:
    """A head of ``kept`` that signed ``size`` with another root than ``root``, if any."""
    return next((k for k in kept if key(k.head)[0] == size and key(k.head)[1] != root), None)


@contextlib.contextmanager
def _locked_log(path: Path) -> Iterator[int]:
    """The head log opened for appending, under an exclusive flock (serialises signers in
    several processes: a training run and a `withdraw`)."""
    with guard_storage(path, "append a signed tree head to"):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


class HeadLog:
    """Sign a tree head over the store after every committed round and ledger change.

    Parameters
    ----------
    store
        The open store (the run directory's ``tree_heads.jsonl`` is the log).
    key
        The run's signing key (from :func:`fedforget.receipts.run_keys.run_signing_key`).
    manifest
        The key manifest, when the run's key was rotated (older heads verify under it).

    Raises
    ------
    ForkedHistoryError
        At construction, when the store does not reproduce a head already signed
        (:func:`check_resume`).
    """

    def __init__(self, store: HistoryStore, key: Ed25519PrivateKey, *,
                 manifest: KeyManifest | None = None) -> None:
        self._store = store
        self._key = key
        self._manifest = manifest
        self._path = RunDirectory(store.directory).tree_heads
        now = check_resume(store, public_key=key.public_key(), manifest=manifest)
        self._tree = MerkleAccumulator()
        for record in store.record_bytes():  # streamed: O(log n) memory, nothing parsed
            self._tree.append(record)
        # The log as this signer last read or wrote it: (its size, what its heads rule
        # out, its lines), so that a round's signature parses the log again only when
        # another process appended to it (the log is append-only), not every round.
        self._known: tuple[int, _SignedHeads, int] | None = None
        # A read-only connection to the index, kept across rounds (opening one costs about
        # a millisecond) and opened again when the index file is another one.
        self._reader: tuple[tuple[int, int], sqlite3.Connection] | None = None
        if self._tree.size != now.size:  # pragma: no cover - the store changed under us
            raise ForkedHistoryError(f"{store.directory} changed while its heads were read")
        logged, _ = read_head_log(self._path)
        self.latest: TreeHead | None = logged[-1].head if logged else None
        if now.size or now.ledger_size:
            self.latest = self.sign()

    def _ledger(self) -> tuple[int, bytes]:
        """Size and root of the ledger as committed (read through a read-only connection of
        this signer's own: the store's may be inside a transaction of its writer thread)."""
        acc = MerkleAccumulator()
        for _, event in ledger_leaves(self._index_reader()):
            acc.append(event)
        return acc.size, acc.root()

    def _index_reader(self) -> sqlite3.Connection:
        """The read-only connection to the store's index file as it is now (a new one when
        the file at that path is not the one the kept connection has open)."""
        index = Path(self._store.directory) / INDEX_FILENAME
        try:
            stat = os.stat(index)
            identity = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:  # sqlite3 refuses to open it, as it always did
            identity = (-1, -1)
        if self._reader is not None and self._reader[0] == identity:
            return self._reader[1]
        if self._reader is not None:
            self._reader[1].close()
        uri = f"file:{urllib.parse.quote(str(index))}?mode=ro"
        # Used by whichever thread signs (one at a time: on_commit runs in commit order).
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        weakref.finalize(self, conn.close)
        self._reader = (identity, conn)
        return conn

    def sign(self) -> TreeHead:
        """Sign and append the head of the store as it is now (rounds seen by ``on_commit``,
        the ledger as committed); return the latest head. A head equal to the last one
        logged is returned as is, not signed again.

        Raises
        ------
        ForkedHistoryError
            If the log already holds another root for this size (:func:`refuse_second_root`).
        StorageError
            If the log cannot be written (the head is then not given out).
        """
        ledger_size, ledger_root = self._ledger()
        state = Commitment(self._tree.size, self._tree.root(), ledger_size, ledger_root)
        with _locked_log(self._path) as fd:
            size = os.fstat(fd).st_size
            if self._known is not None and self._known[0] == size:
                _, signed, lines = self._known  # nothing appended since: the same heads
            else:
                logged, _ = read_head_log(self._path)
                signed = _SignedHeads(logged)
                lines = self._path.read_bytes().count(b"\n")
            if signed.last is not None and state.matches(signed.last.head):
                self.latest = signed.last.head
                self._known = (size, signed, lines)
                return self.latest
            signed.refuse(state, self._path)
            head = sign_tree_head(state.size, state.root, self._key,
                                  ledger_size=state.ledger_size, ledger_root=state.ledger_root)
            encoded = head.to_json()
            with guard_storage(self._path, "append a signed tree head to",
                               "the head was not given out"):
                data = memoryview(encoded)
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            signed.add(LoggedHead(head, f"{self._path.name} line {lines + 1}"))
            self._known = (size + len(encoded), signed, lines + 1)
        self.latest = head
        return head

    def on_commit(self, record: RoundRecord) -> None:
        """Add ``record`` (the next round) to the tree and sign the new head."""
        self._tree.append(record.canonical_bytes())
        self.latest = self.sign()

    def config(self) -> dict[str, str]:
        """Train-config entries carrying the latest head to the clients."""
        if self.latest is None:
            return {}
        return {TREE_HEAD: self.latest.to_json().decode()}

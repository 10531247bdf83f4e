"""HeadLog: a head per committed round and per ledger change, none twice, never two roots
for one size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedforget.history import ForkedHistoryError, HeadLog, HistoryStore, ParticipantUpdate
from fedforget.history.commitment import Commitment, LoggedHead, read_head_log
from fedforget.history.heads import refuse_second_root
from fedforget.receipts.merkle import tree_root
from fedforget.receipts.tree_head import (
    EMPTY_LEDGER_ROOT,
    TreeHead,
    sign_tree_head,
    verify_tree_head,
)
from fedforget.withdrawal import WithdrawalLedger

KEY = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)


def model(t: int) -> dict[str, np.ndarray]:
    return {"w": np.full(3, t, np.float32)}


def commit(store: HistoryStore, t: int, before: str) -> str:
    return store.commit_round(
        round=t, global_before=before, global_after=model(t), config={},
        participants=[ParticipantUpdate("client-000", 2, 1.0, t, model(t))],
    ).global_after


def test_a_head_per_round_and_per_ledger_change(tmp_path: Path) -> None:
    store = HistoryStore.create(tmp_path / "run", run_config={"seed": 0})
    store.set_roster(["client-000", "client-001"])
    before = store.put_initial_model(model(0))
    log = HeadLog(store, KEY)
    assert log.latest is None and log.config() == {}
    records = []
    for t in (1, 2):
        before = commit(store, t, before)
        records.append(store.round(t))
        log.on_commit(records[-1])
    heads = [h.head for h in read_head_log(tmp_path / "run" / "tree_heads.jsonl")[0]]
    assert [(h.size, h.ledger_size) for h in heads] == [(1, 0), (2, 0)]
    assert heads[1].root == tree_root(r.canonical_bytes() for r in records)[1].hex()
    assert heads[1].ledger_root == EMPTY_LEDGER_ROOT
    for h in heads:
        verify_tree_head(h, public_key=KEY.public_key())
    # A ledger change, then its head: same rounds, one more event.
    with WithdrawalLedger(tmp_path / "run") as ledger:
        ledger.request("client-001", reason="", roster=frozenset(store.roster()))
    head = log.sign()
    assert (head.size, head.root, head.ledger_size) == (2, heads[1].root, 1)
    # A resume signs nothing new; the latest head goes to the clients.
    again = HeadLog(store, KEY)
    assert again.latest == head and "fedforget.tree-head" in again.config()
    assert len(read_head_log(tmp_path / "run" / "tree_heads.jsonl")[0]) == 3
    store.close()


def test_a_head_log_of_another_history_is_refused(tmp_path: Path) -> None:
    # Two stores with different round 1; the second is given the first one's head log.
    for name, t in (("a", 1), ("b", 7)):
        store = HistoryStore.create(tmp_path / name, run_config={})
        before = store.put_initial_model(model(0))
        before = store.commit_round(
            round=1, global_before=before, global_after=model(t), config={},
            participants=[ParticipantUpdate("client-000", 2, 1.0, 1, model(t))],
        ).global_after
        if name == "a":
            HeadLog(store, KEY)
        store.close()
    (tmp_path / "b" / "tree_heads.jsonl").write_bytes(
        (tmp_path / "a" / "tree_heads.jsonl").read_bytes())
    with HistoryStore.open(tmp_path / "b") as store, pytest.raises(ForkedHistoryError) as info:
        HeadLog(store, KEY)
    assert "round 1 differs from what tree_heads.jsonl line 1 signed" in str(info.value)


def test_a_head_signed_by_another_key_is_refused_at_resume(tmp_path: Path) -> None:
    store = HistoryStore.create(tmp_path / "run", run_config={})
    commit(store, 1, store.put_initial_model(model(0)))
    HeadLog(store, Ed25519PrivateKey.generate())
    with pytest.raises(ForkedHistoryError, match="signature: tree_heads.jsonl line 1 does not "
                       "verify under key"):
        HeadLog(store, KEY)
    store.close()


def test_the_log_is_read_again_only_when_another_signer_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count the full reads of the log by the signer
    import fedforget.history.heads as heads_module

    reads: list[int] = []
    real = heads_module.read_head_log

    def counting(path: object) -> object:
        reads.append(1)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(heads_module, "read_head_log", counting)
    store = HistoryStore.create(tmp_path / "run", run_config={"seed": 0})
    store.set_roster(["client-000", "client-001"])
    before = store.put_initial_model(model(0))
    log = HeadLog(store, KEY)
    # Execute: five rounds signed by this signer alone, then another signer (a `withdraw`
    # in another process) appends a head, then one more round
    for t in range(1, 6):
        before = commit(store, t, before)
        log.on_commit(store.round(t))
    alone = len(reads)
    with WithdrawalLedger(tmp_path / "run") as ledger:
        ledger.request("client-001", reason="", roster=frozenset(store.roster()))
    other = HeadLog(store, KEY)  # signs the ledger change
    before = commit(store, 6, before)
    log.on_commit(store.round(6))
    # Assert: two reads to construct (the resume check and the latest head), one for the
    # first signature, none for rounds 2-5; the other signer's three, and one more for
    # round 6, after its append; the log is what a full read finds, its lines numbered as
    # read_head_log numbers them
    assert alone == 3
    assert len(reads) == 3 + 3 + 1
    logged = real(tmp_path / "run" / "tree_heads.jsonl")[0]
    assert [(h.head.size, h.head.ledger_size) for h in logged] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (5, 1), (6, 1)]
    assert log._known is not None  # noqa: SLF001
    assert log._known[1].last == logged[-1] and log._known[2] == len(logged)  # noqa: SLF001
    assert other.latest is not None and other.latest.ledger_size == 1
    store.close()


def _scan_refuses(heads: list[LoggedHead], new: Commitment) -> bool:
    """The rule as the head log states it, one head at a time: another root for a size or
    ledger size signed before, or a size or ledger size smaller than one signed."""
    return any(
        (h.head.size == new.size and h.head.root != new.root.hex())
        or (h.head.ledger_size == new.ledger_size and h.head.ledger_root != new.ledger_root.hex())
        or h.head.size > new.size or h.head.ledger_size > new.ledger_size
        for h in heads
    )


def test_the_kept_summary_refuses_exactly_what_a_scan_of_every_head_refuses() -> None:
    # Arrange: random logs, forked ones among them (sizes out of order, two roots for one
    # size), from a pool of three roots so that clashes are common
    rng = np.random.default_rng(7)
    roots = [bytes([i]) * 32 for i in range(3)]

    empty = bytes.fromhex(EMPTY_LEDGER_ROOT)  # the only ledger root of no events

    def head(size: int, root: bytes, ledger_size: int, ledger_root: bytes) -> TreeHead:
        return sign_tree_head(size, root, KEY, ledger_size=ledger_size,
                              ledger_root=ledger_root if ledger_size else empty,
                              timestamp="2026-01-01T00:00:00Z")

    cases = refused = 0
    for _ in range(300):
        heads = [LoggedHead(head(int(rng.integers(0, 6)), roots[rng.integers(3)],
                                 int(rng.integers(0, 3)), roots[rng.integers(3)]), f"line {i + 1}")
                 for i in range(int(rng.integers(0, 6)))]
        for _ in range(6):
            ledger_size = int(rng.integers(0, 4))
            new = Commitment(int(rng.integers(0, 7)), roots[rng.integers(3)],
                             ledger_size, roots[rng.integers(3)] if ledger_size else empty)
            # Act
            try:
                refuse_second_root(heads, new, Path("tree_heads.jsonl"))
            except ForkedHistoryError:
                got = True
            else:
                got = False
            # Assert
            assert got == _scan_refuses(heads, new), (heads, new)
            cases += 1
            refused += got
    assert 0.2 * cases < refused < 0.8 * cases  # both outcomes were exercised


def test_signing_keeps_no_head_list_that_grows_with_rounds(tmp_path: Path) -> None:
    # Arrange: a store with one round, then a hundred more signatures over it
    store = HistoryStore.create(tmp_path / "run", run_config={"seed": 0})
    store.set_roster(["client-000"])
    commit(store, 1, store.put_initial_model(model(0)))
    log = HeadLog(store, KEY)

    class Record:
        def __init__(self, t: int) -> None:
            self.data = f"round {t}".encode()

        def canonical_bytes(self) -> bytes:
            return self.data

    # Act
    for t in range(2, 102):
        log.on_commit(Record(t))  # type: ignore[arg-type]
    # Assert: the log holds every head; the signer keeps the last and those of the
    # largest sizes only
    logged, problems = read_head_log(tmp_path / "run" / "tree_heads.jsonl")
    assert not problems and len(logged) == 101
    assert log._known is not None  # noqa: SLF001
    signed = log._known[1]  # noqa: SLF001
    assert signed.last == logged[-1]
    assert signed._top == [logged[-1]] and len(signed._top_ledger) == 1  # noqa: SLF001
    store.close()

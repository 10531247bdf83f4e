"""`fedforget history verify` against the signed tree heads: edits behind fedforget's back
(deleted rows, run config, roster, weights, ledger), a forked log, a given head, a read-only
copy, and the resume check that refuses to sign a second root."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from trust_helpers import built_run, copy_run, sign_current_head, sql

from fedforget.cli import main
from fedforget.history import HistoryStore, verify_store
from fedforget.history.commitment import Commitment, read_head_log
from fedforget.history.heads import ForkedHistoryError, HeadLog, check_resume, refuse_second_root
from fedforget.receipts.keys import load_private_key
from fedforget.receipts.tree_head import sign_tree_head


@pytest.fixture
def run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_run(built_run(tmp_path_factory), tmp_path / "run")


def problems(run: Path, **kwargs: object) -> list[str]:
    return verify_store(run, **kwargs).problems  # type: ignore[arg-type]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_intact_run_verifies_with_every_check_made(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = verify_store(run)
    assert report.ok, report.problems
    # 3 round heads; 3 ledger heads (the unlearn command signs after it records and orders
    # the request — events 1-2 — the service after it moves it to unlearning and to done);
    # 4 heads the clients saved; 1 receipt; the result and the cached reference.
    assert (report.heads_checked, report.receipts_checked, report.results_checked) == (10, 1, 2)
    assert main(["history", "verify", str(run)]) == 0
    assert "10 signed tree heads, 1 receipts and 2 results agree" in capsys.readouterr().out


def test_deleting_the_last_rounds_rows_is_caught_naming_the_round(run: Path) -> None:
    for table in ("participants", "models", "rounds"):
        sql(run, f"DELETE FROM {table} WHERE round = 3")
    found = problems(run)
    assert any("round 3 was committed and signed (tree_heads.jsonl line 3: size 3" in p
               and "the store holds 2: dropped" in p for p in found), found
    # The receipt cites 3 rounds too.
    assert any("rounds 3-3 were dropped" in p and "receipt" in p for p in found), found


def test_an_edited_run_config_is_caught_naming_the_key(run: Path) -> None:
    with HistoryStore.open(run) as store:
        config = store.run_config
    config["seed"] = 8
    sql(run, "UPDATE meta SET value = ? WHERE key = 'run_config'",
        json.dumps(config, sort_keys=True, separators=(",", ":")))
    found = problems(run)
    assert any("meta.run_config differs from the run context that the round records commit "
               "to: seed is 8, committed 7" in p for p in found), found


def test_an_edited_run_context_is_caught_by_the_records(run: Path) -> None:
    with HistoryStore.open(run) as store:
        context = json.loads(store.run_context)
    context["run-config"]["seed"] = 8
    sql(run, "UPDATE meta SET value = ? WHERE key = 'run_context'", json.dumps(context))
    found = problems(run)
    assert any("meta.run_context hashes to" in p and "the run context was changed after "
               "round 1" in p for p in found), found


def test_an_edited_roster_is_caught(run: Path) -> None:
    sql(run, "UPDATE meta SET value = ? WHERE key = 'roster'",
        json.dumps(["client-000", "client-002", "client-003"]))
    found = problems(run)
    assert any("meta.roster differs from the run context" in p
               and "drops ['client-001']" in p for p in found), found


def test_an_edited_weight_or_count_column_is_caught(run: Path) -> None:
    sql(run, "UPDATE participants SET weight = 0.9 WHERE round = 2 AND client_id = 'client-002'")
    sql(run, "UPDATE participants SET num_examples = 1000000000 WHERE round = 1 "
             "AND client_id = 'client-000'")
    found = problems(run)
    assert any(p.startswith("round 2: participants in index") and "client-002" in p
               for p in found), found
    assert any(p.startswith("round 1: participants in index") and "client-000" in p
               for p in found), found


def test_a_rewritten_record_with_a_fresh_digest_is_caught_by_the_signed_head(run: Path) -> None:
    # An attacker rewrites round 2's record (a weight) and recomputes its digest, so that
    # the store is consistent with itself; only the signed heads can tell.
    import sqlite3

    conn = sqlite3.connect(run / "history.sqlite")
    (record,) = conn.execute("SELECT record FROM rounds WHERE round = 2").fetchone()
    data = json.loads(record)
    data["participants"][0]["weight"] = 0.75
    new = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    conn.execute("UPDATE rounds SET record = ?, record_digest = ? WHERE round = 2",
                 (new, "sha256:" + hashlib.sha256(new).hexdigest()))
    conn.commit()
    conn.close()
    found = problems(run)
    assert any(p.startswith("round 2 differs from what tree_heads.jsonl line 2 signed")
               for p in found), found


def test_an_edited_ledger_is_caught(run: Path) -> None:
    # As in the issue; the triggers log the change as a new event, which no head signed.
    sql(run, "UPDATE withdrawals SET state = 'done', client_id = 'client-004'")
    found = problems(run)
    assert any("withdrawal events 5-5" in p and "client-004" in p
               and "not covered by any signed tree head" in p for p in found), found


def test_an_edited_ledger_behind_the_triggers_is_caught(run: Path) -> None:
    sql(run, "DROP TRIGGER withdrawals_logged_on_update")
    sql(run, "UPDATE withdrawals SET client_id = 'client-004'")
    found = problems(run)
    assert any("differs from its last logged event 4: client_id is 'client-004', logged "
               "'client-001'" in p for p in found), found


def test_a_deleted_withdrawal_event_is_caught_by_the_ledger_root(run: Path) -> None:
    sql(run, "DROP TRIGGER withdrawal_events_never_deleted")
    sql(run, "DROP TRIGGER withdrawals_never_deleted")
    sql(run, "DELETE FROM withdrawal_events")
    sql(run, "DELETE FROM withdrawals")
    found = problems(run)
    assert any(p.startswith("withdrawal events 1..4 were committed and signed") for p in found), (
        found)


def test_a_head_given_on_the_command_line_is_checked(run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    saved = run / "client-state" / "client-000" / "head.json"
    assert main(["history", "verify", str(run), "--head", str(saved)]) == 0
    # A head of the same key for another history of size 2: a fork.
    key = load_private_key(run / "keys" / "signing.key")
    forged = sign_tree_head(2, "ab" * 32, key)
    (tmp_path / "other.json").write_bytes(forged.to_json())
    capsys.readouterr()
    assert main(["history", "verify", str(run), "--head", str(tmp_path / "other.json")]) == 1
    err = capsys.readouterr().err
    assert "forked log: tree_heads.jsonl line 2, given head" in err
    assert "sign 2 different round roots for the same size 2" in err


def test_verify_never_changes_a_byte(run: Path) -> None:
    # With a live write-ahead log too: copy the index while a store holds it open.
    live = HistoryStore.open(run)
    try:
        wal_run = copy_run(run, run.parent / "with-wal")
    finally:
        live.close()
    for folder in (run, wal_run):
        before = snapshot(folder)
        assert verify_store(folder).ok
        assert snapshot(folder) == before  # same bytes, same mtimes, no -shm, no new file


def test_verify_on_a_read_only_file_system(run: Path, tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    fedforget = Path(sys.executable).parent / "fedforget"
    script = (f"mount --bind {run} {mount} && mount -o remount,ro,bind {mount} && "
              f"{fedforget} history verify {mount}")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {run} {mount}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no read-only bind mount here (unshare -m needs CAP_SYS_ADMIN)")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: 3 rounds")


def test_the_resume_check_refuses_a_store_that_lost_signed_rounds(run: Path) -> None:
    # SQLite silently dropped round 3 (e.g. a damaged WAL frame read by plain sqlite3).
    for table in ("participants", "models", "rounds"):
        sql(run, f"DELETE FROM {table} WHERE round = 3")
    log = (run / "tree_heads.jsonl").read_bytes()
    key = load_private_key(run / "keys" / "signing.key")
    with HistoryStore.open(run) as store:
        with pytest.raises(ForkedHistoryError) as info:
            check_resume(store, public_key=key.public_key())
        assert "round 3 was committed and signed" in str(info.value)
        assert "Resuming would sign a second root" in str(info.value)
        with pytest.raises(ForkedHistoryError):
            HeadLog(store, key)
    assert (run / "tree_heads.jsonl").read_bytes() == log  # no second root signed


def test_the_forked_log_case_damaged_wal_then_resume_is_refused(run: Path) -> None:
    # A damaged frame in the WAL: opening refuses before SQLite can drop the frames, so no
    # resume reaches the head signer.
    from fedforget.withdrawal import WithdrawalLedger

    store = HistoryStore.open(run)  # held open: what follows stays in the WAL, as at a crash
    with WithdrawalLedger(run) as ledger:
        ledger.request("client-002", reason="moving", roster=frozenset(store.roster()))
    HeadLog(store, load_private_key(run / "keys" / "signing.key"))  # signs ledger size 4
    crashed = copy_run(run, run.parent / "crashed")
    store.close()
    wal = crashed / "history.sqlite-wal"
    data = bytearray(wal.read_bytes())
    assert len(data) > 32
    data[32 + 24 + 50] ^= 0x01  # page data of frame 1: later frames chain on from it
    wal.write_bytes(bytes(data))
    log = (crashed / "tree_heads.jsonl").read_bytes()
    from fedforget.errors import IntegrityError

    with pytest.raises(IntegrityError, match=r"history.sqlite-wal is damaged at frame 1 "
                       r"\(byte 32\): its checksum does not match"):
        HistoryStore.open(crashed)
    found = problems(crashed)
    assert any("history.sqlite-wal is damaged at frame 1" in p for p in found), found
    assert (crashed / "tree_heads.jsonl").read_bytes() == log


def test_no_second_root_for_a_size_and_no_duplicate_heads(run: Path) -> None:
    log = run / "tree_heads.jsonl"
    heads, _ = read_head_log(log)
    key = load_private_key(run / "keys" / "signing.key")
    with HistoryStore.open(run) as store:
        HeadLog(store, key)  # a resume: the head is unchanged, nothing is appended
    assert read_head_log(log)[0] == heads
    other = Commitment(3, b"\x07" * 32, heads[-1].head.ledger_size,
                       bytes.fromhex(heads[-1].head.ledger_root))
    with pytest.raises(ForkedHistoryError, match="already signed root .* for that size"):
        refuse_second_root(heads, other, log)


def test_a_withdrawal_signed_after_training_verifies(run: Path) -> None:
    from fedforget.withdrawal import WithdrawalLedger

    with HistoryStore.open(run) as store:
        roster = frozenset(store.roster())
    with WithdrawalLedger(run) as ledger:
        ledger.request("client-002", reason="moving", roster=roster)
    assert any("withdrawal events 5-5" in p for p in problems(run))
    sign_current_head(run)  # the wiring the server needs after each ledger change
    assert verify_store(run).ok


def test_heads_after_a_key_rotation_verify_through_the_manifest(run: Path) -> None:
    from fedforget.receipts.run_keys import rotate_keys, run_signing_key

    rotate_keys(run / "keys")
    key, _ = run_signing_key(run)  # the new key is accepted: the manifest rotates to it
    from fedforget.receipts.run_keys import load_manifest

    with HistoryStore.open(run) as store:
        HeadLog(store, key, manifest=load_manifest(run / "keys"))
    report = verify_store(run)
    assert report.ok, report.problems


def test_a_flipped_public_key_is_named(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pub = run / "keys" / "signing.pub"
    data = bytearray(pub.read_bytes())
    data[40] ^= 0x02
    pub.write_bytes(bytes(data))
    assert main(["history", "verify", str(run)]) == 1
    assert "keys/signing.pub" in capsys.readouterr().err


def test_a_run_without_heads_but_with_keys_is_refused(run: Path) -> None:
    (run / "tree_heads.jsonl").unlink()
    shutil.rmtree(run / "client-state")
    found = problems(run)
    assert any("holds no signed tree head, yet the run has signing keys" in p for p in found)

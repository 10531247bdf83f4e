"""Checks of a run directory around its history store (the second half of
:func:`fedforget.history.verify_store`). Read-only, like the rest of verification.

1. **Keys**: ``keys/signing.pub`` parses; ``keys/signing.key``, if present, is its private
   half; ``keys/manifest.json``, if present, is a valid chain rooted in the trusted key.
2. **Signed tree heads** (``tree_heads.jsonl``, the head handed in with ``head``, the heads
   in ``client-state/*/head.json`` and ``withdrawals/*/head.json``): every line is a
   canonical version 2 head whose signature verifies (under the manifest, at its time);
   every head is reproduced by the store (:func:`~fedforget.history.commitment.compare_heads`
   names the dropped or rewritten round or withdrawal event, and any fork); every committed
   round and withdrawal event is covered by a signed head; a run that has keys or receipts
   has heads.
3. **Receipts** (``receipts/*.json``): each verifies under the run's key; the history it
   cites is a prefix of the store and its original model is the store's model at that
   size; the chain of ``previous-receipt`` links is one line ending at ``receipts/latest``;
   each receipt belongs to a committed result; each salt in ``client-state/<client>/`` opens
   its receipt's commitment to that client.
4. **Results** (``unlearned/<request>/<method>/result.json``) and **cached references**
   (``unlearned/reference-*/``): the model file hashes to the recorded digest; a result's
   receipt names the same models, request, method and reference; its withdrawal request is
   ``done`` in the ledger; a replayed history in the result verifies as a store; the model in
   service (``unlearned/current.json``) is a committed result's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedforget.errors import FedForgetError
from fedforget.history.commitment import (
    LoggedHead,
    commitment_of,
    compare_heads,
    ledger_rows,
    read_head_log,
    round_leaves,
)
from fedforget.history.report import VerifyReport
from fedforget.history.wal import WalReport
from fedforget.receipts.errors import ReceiptError
from fedforget.receipts.keys import key_id, load_private_key, public_key_from_pem
from fedforget.receipts.manifest import KeyManifest
from fedforget.receipts.merkle import MerkleAccumulator
from fedforget.receipts.receipt import client_commitment, receipt_digest
from fedforget.receipts.tree_head import TreeHead, verify_tree_head
from fedforget.receipts.verify import VerifiedReceipt, verify_receipt
from fedforget.results import ReferenceRecord, ResultError, UnlearningOutcome
from fedforget.rundir import (
    CLIENT_STATE_DIR,
    HEAD_FILE,
    PARTIAL_MARK,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    RESULT_FILE,
    WITHDRAWALS_DIR,
    RunDirectory,
    forget_key,
)

__all__ = ["MANIFEST_FILE", "audit_run_directory"]

MANIFEST_FILE = "manifest.json"
"""The key manifest's file name in the keys directory."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class _Trust:
    """The key (and manifest) signatures are checked with."""

    def __init__(self, run: RunDirectory, given: Ed25519PublicKey | str | os.PathLike[str] | None,
                 report: VerifyReport) -> None:
        self.public_key: Ed25519PublicKey | None = None
        self.manifest: KeyManifest | None = None
        self.source = ""
        keys = run.default_keys
        pub_path = keys / PUBLIC_KEY_FILE
        if isinstance(given, Ed25519PublicKey):
            self.public_key, self.source = given, "the given public key"
        elif given is not None:
            try:
                self.public_key = public_key_from_pem(Path(given).read_bytes(), str(given))
                self.source = str(given)
            except (OSError, ReceiptError) as exc:
                report.problems.append(f"public key {given}: {exc}")
        elif pub_path.exists():
            try:
                self.public_key = public_key_from_pem(pub_path.read_bytes(), str(pub_path))
                self.source = str(pub_path)
            except (OSError, ReceiptError) as exc:
                report.problems.append(f"{pub_path}: {exc}")
        key_path = keys / PRIVATE_KEY_FILE
        if key_path.exists() and pub_path.exists():
            try:
                private = load_private_key(key_path)
                public = public_key_from_pem(pub_path.read_bytes(), str(pub_path))
                if key_id(private.public_key()) != key_id(public):
                    report.problems.append(
                        f"{key_path} is not the private key of {pub_path} (its public key is "
                        f"{key_id(private.public_key())}, {pub_path.name} is {key_id(public)})"
                    )
            except (OSError, ReceiptError) as exc:
                report.problems.append(f"{key_path}: {exc}")
        manifest_path = keys / MANIFEST_FILE
        if manifest_path.exists() and self.public_key is not None:
            try:
                self.manifest = KeyManifest.from_json(manifest_path.read_bytes(),
                                                      trusted_key=self.public_key)
            except (OSError, ReceiptError) as exc:
                report.problems.append(f"{manifest_path}: {exc}")

    @property
    def usable(self) -> bool:
        return self.public_key is not None

    def kwargs(self) -> dict[str, Any]:
        if self.manifest is not None:
            return {"public_key": None, "manifest": self.manifest}
        return {"public_key": self.public_key, "manifest": None}


def _verified_heads(logged: Iterable[LoggedHead], trust: _Trust, report: VerifyReport,
                    file: Path) -> list[LoggedHead]:
    good: list[LoggedHead] = []
    for item in logged:
        try:
            verify_tree_head(item.head, what=f"{file.name}: {item.where}", **trust.kwargs())
        except ReceiptError as exc:
            report.problems.append(f"{file}: {item.where.split(' ', 1)[-1]}: {exc}")
            continue
        good.append(item)
    return good


def _single_head(path: Path, label: str, trust: _Trust, report: VerifyReport
                 ) -> LoggedHead | None:
    try:
        head = TreeHead.from_json(path.read_bytes())
    except OSError as exc:
        report.problems.append(f"{label} {path}: cannot be read: {exc.strerror or exc}")
        return None
    except ReceiptError as exc:
        report.problems.append(f"{label} {path}: {exc}")
        return None
    item = LoggedHead(head, f"{label} {path}")
    if not trust.usable:
        report.notes.append(f"the signature of {label} {path} was not checked: no public key")
        return item
    return item if _verified_heads([item], trust, report, path) else None


def _check_heads(run: RunDirectory, conn: sqlite3.Connection, trust: _Trust,
                 report: VerifyReport, head: str | os.PathLike[str] | None,
                 has_receipts: bool) -> list[LoggedHead]:
    logged, problems = read_head_log(run.tree_heads)
    report.problems.extend(problems)
    if logged and not trust.usable:
        report.problems.append(
            f"{run.tree_heads}: the signatures of {len(logged)} head(s) cannot be checked: no "
            f"public key ({run.default_keys / PUBLIC_KEY_FILE} is missing; give one with --key)"
        )
        valid = logged
    else:
        valid = _verified_heads(logged, trust, report, run.tree_heads)
    others: list[LoggedHead] = []
    if head is not None:
        item = _single_head(Path(head), "given head", trust, report)
        if item is not None:
            others.append(item)
    for folder in (run.path / CLIENT_STATE_DIR, run.path / WITHDRAWALS_DIR):
        if folder.is_dir():
            for saved in sorted(folder.glob(f"*/{HEAD_FILE}")):
                item = _single_head(saved, "saved head", trust, report)
                if item is not None:
                    others.append(item)
    report.problems.extend(compare_heads(conn, valid + others))
    report.heads_checked += len(valid) + len(others)
    state = commitment_of(conn)
    if valid:
        top = max(h.head.size for h in valid)
        if state.size > top:
            report.problems.append(
                f"rounds {top + 1}-{state.size} are not covered by any signed tree head "
                f"({run.tree_heads}: the largest has size {top}): they were committed after "
                "the last head was signed, or added without the key"
            )
        top_ledger = max(h.head.ledger_size for h in valid)
        if state.ledger_size > top_ledger:
            events = ledger_rows(conn)[top_ledger:]
            listed = "; ".join(f"{e[0]}: {e[1]} of {e[2]}, {e[5]}" for e in events[:5])
            report.problems.append(
                f"withdrawal events {top_ledger + 1}-{state.ledger_size} ({listed}) are not "
                f"covered by any signed tree head ({run.tree_heads}: the largest has ledger "
                f"size {top_ledger})"
            )
    elif state.size or state.ledger_size:
        signs = (run.default_keys / PUBLIC_KEY_FILE).exists() or has_receipts
        if signs:
            report.problems.append(
                f"{run.tree_heads} holds no signed tree head, yet the run has signing keys or "
                f"receipts and {state.size} committed round(s): the head log was removed"
            )
        else:
            report.notes.append(
                "no signed tree head: the store was checked against its own digests only "
                "(give a head with --head to check it against one)"
            )
    return valid


def _roots_at(conn: sqlite3.Connection, sizes: Iterable[int]) -> dict[int, str]:
    wanted = set(sizes)
    acc = MerkleAccumulator()
    roots = {0: acc.root().hex()}
    for _, record in round_leaves(conn):
        acc.append(record)
        if acc.size in wanted:
            roots[acc.size] = acc.root().hex()
    return roots


def _model_digest_at(conn: sqlite3.Connection, t: int) -> str | None:
    row = conn.execute("SELECT digest FROM models WHERE round = ?", (t,)).fetchone()
    return None if row is None else str(row[0])


def _check_receipts(run: RunDirectory, conn: sqlite3.Connection, trust: _Trust,
                    report: VerifyReport) -> dict[str, tuple[Path, VerifiedReceipt]]:
    """Check 3; the verified receipts by id."""
    folder = run.receipts
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
    verified: dict[str, tuple[Path, VerifiedReceipt]] = {}
    digests: dict[str, str] = {}
    if files and not trust.usable:
        report.problems.append(
            f"{folder}: {len(files)} receipt(s) cannot be checked: no public key "
            f"({run.default_keys / PUBLIC_KEY_FILE} is missing; give one with --key)"
        )
        return {}
    for path in files:
        try:
            data = path.read_bytes()
            checked = verify_receipt(data, **trust.kwargs())
        except OSError as exc:
            report.problems.append(f"receipt {path}: cannot be read: {exc.strerror or exc}")
            continue
        except ReceiptError as exc:
            report.problems.append(f"receipt {path}: {exc}")
            continue
        if path.stem != checked.receipt_id:
            report.problems.append(
                f"receipt {path}: it is receipt {checked.receipt_id!r}, not {path.stem!r}"
            )
        verified[checked.receipt_id] = (path, checked)
        digests[receipt_digest(data)] = checked.receipt_id
        report.receipts_checked += 1
    roots = _roots_at(conn, (c.statement.history.size for _, c in verified.values()))
    n = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    for _rid, (path, checked) in sorted(verified.items()):
        history = checked.statement.history
        if history.size > n:
            report.problems.append(
                f"receipt {path}: it cites a history of {history.size} rounds; the store holds "
                f"{n}: rounds {n + 1}-{history.size} were dropped"
            )
        elif roots.get(history.size) != history.root:
            report.problems.append(
                f"receipt {path}: it cites history root {history.root} for {history.size} "
                f"rounds; the store's first {history.size} rounds hash to "
                f"{roots.get(history.size)}: a round in 1-{history.size} was rewritten"
            )
        elif _model_digest_at(conn, history.size) != checked.original_model:
            report.problems.append(
                f"receipt {path}: its original model is {checked.original_model}; the store's "
                f"model after round {history.size} is {_model_digest_at(conn, history.size)}"
            )
    # The chain: one line of links, its head named by receipts/latest.
    previous = {rid: c.statement.previous_receipt for rid, (_, c) in verified.items()}
    named: dict[str, list[str]] = {}
    for rid, link in previous.items():
        if link is None:
            continue
        if link not in digests:
            report.problems.append(
                f"receipt {verified[rid][0]}: its previous receipt {link} is not in {folder}"
            )
            continue
        named.setdefault(digests[link], []).append(rid)
    for target, sources in sorted(named.items()):
        if len(sources) > 1:
            report.problems.append(
                f"receipts {', '.join(sorted(sources))} all chain onto receipt {target}: the "
                "receipt chain is forked"
            )
    roots_of_chain = [rid for rid, link in previous.items() if link is None]
    if verified and len(roots_of_chain) != 1:
        report.problems.append(
            f"{folder}: {len(roots_of_chain)} receipts start a chain (previous-receipt null); "
            "expected exactly one"
        )
    latest = run.latest_receipt
    if verified or latest.exists():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            report.problems.append(f"{latest}: cannot be read: {exc}")
        else:
            tips = sorted(set(verified) - set(named))
            target = name.removesuffix(".json")
            if target not in verified:
                report.problems.append(
                    f"{latest} names {name!r}, which is not a verified receipt in {folder}"
                )
            elif tips != [target]:
                report.problems.append(
                    f"{latest} names {target}, but the chain ends at {', '.join(tips) or 'none'}"
                )
    # Salts: each opens its receipt's commitment to its client — those delivered to a
    # simulated client's state directory, and those waiting in a request's outbox.
    salts: list[tuple[Path, str]] = []
    state = run.path / CLIENT_STATE_DIR
    if state.is_dir():
        salts += [(p, p.parent.parent.name) for p in sorted(state.glob("*/receipts/*.salt"))]
    clients_of = (dict(conn.execute("SELECT request_id, client_id FROM withdrawals"))
                  if _has_withdrawals(conn) else {})
    for outbox in run.outboxes():
        client_of_request = clients_of.get(outbox.parent.name)
        for p in sorted(outbox.glob("*.salt")):
            if client_of_request is None:
                report.problems.append(f"salt {p}: its request {outbox.parent.name} is not "
                                       "in the withdrawal ledger")
            else:
                salts.append((p, client_of_request))
    if salts:
        for salt_path, client in salts:
            rid = salt_path.stem
            try:
                salt = bytes.fromhex(salt_path.read_text(encoding="ascii").strip())
            except (OSError, ValueError) as exc:
                report.problems.append(f"salt {salt_path}: not a hex salt: {exc}")
                continue
            if rid not in verified:
                report.problems.append(f"salt {salt_path}: no verified receipt {rid} in {folder}")
                continue
            try:
                found = client_commitment(salt, client)
            except ReceiptError as exc:
                report.problems.append(f"salt {salt_path}: {exc}")
                continue
            if found != verified[rid][1].statement.client_commitment:
                report.problems.append(
                    f"salt {salt_path}: with client {client!r} it gives {found}; receipt {rid} "
                    f"commits to {verified[rid][1].statement.client_commitment}"
                )
    return verified


def _read_json(path: Path, report: VerifyReport) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        report.problems.append(f"{path}: not readable JSON: {exc}")
        return None
    if not isinstance(data, dict):
        report.problems.append(f"{path}: holds a {type(data).__name__}; expected an object")
        return None
    return data




def _check_model_file(run: RunDirectory, relative: object, digest: object, owner: Path,
                      report: VerifyReport) -> bool:
    if not isinstance(relative, str) or not isinstance(digest, str):
        report.problems.append(f"{owner}: model_path {relative!r} / model_digest {digest!r} "
                               "are not strings")
        return False
    model = (run.path / relative).resolve()
    if run.path.resolve() not in model.parents:
        report.problems.append(f"{owner}: model_path {relative!r} is outside the run directory")
        return False
    try:
        found = _sha256_file(model)
    except OSError as exc:
        report.problems.append(f"{owner}: model file {model} cannot be read: "
                               f"{exc.strerror or exc}")
        return False
    if found != digest:
        report.problems.append(
            f"model file {model}: its SHA-256 is {found}, but {owner.name} records {digest}"
        )
        return False
    return True


Nested = Callable[[Path], VerifyReport]


def _check_replayed_history(directory: Path, owner: Path, report: VerifyReport,
                            nested: Nested) -> None:
    try:
        inner = nested(directory)
    except FedForgetError as exc:
        report.problems.append(f"{owner}: its replayed history {directory}: {exc}")
        return
    report.problems.extend(f"replayed history {directory}: {p}" for p in inner.problems)


def _check_results(run: RunDirectory, conn: sqlite3.Connection,
                   receipts: dict[str, tuple[Path, VerifiedReceipt]],
                   report: VerifyReport, nested: Nested) -> None:
    """Check 4, and that every receipt belongs to a committed result."""
    unlearned = run.unlearned
    if not unlearned.is_dir():
        for _rid, (path, _) in sorted(receipts.items()):
            report.problems.append(f"receipt {path}: no committed result names it")
        return
    ledger = {r[0]: r for r in conn.execute(
        "SELECT request_id, client_id, state FROM withdrawals")} if _has_withdrawals(conn) else {}
    references: dict[str, str] = {}
    for ref in sorted(unlearned.glob("reference-*")):
        if PARTIAL_MARK in ref.name or not ref.is_dir():
            continue
        result = ref / RESULT_FILE
        report.results_checked += 1
        try:
            record = ReferenceRecord.read(result)
        except ResultError as exc:
            report.problems.append(f"{result}: not a reference record: {exc}")
            continue
        if f"reference-{forget_key(record.forgotten)}" != ref.name:
            report.problems.append(f"{result}: forgotten {record.forgotten!r} does not give the "
                                   f"directory name {ref.name}")
        if _check_model_file(run, str(ref.relative_to(run.path) / record.model_path),
                             record.model_digest, result, report):
            references[ref.name] = record.model_digest
        if record.history_dir:
            _check_replayed_history(ref / record.history_dir, result, report, nested)
    named_receipts: set[str] = set()
    results: dict[tuple[str, str], str] = {}
    for result in sorted(unlearned.glob(f"*/*/{RESULT_FILE}")):
        method_dir = result.parent
        request_dir = method_dir.parent
        if (request_dir.name.startswith("reference-") or PARTIAL_MARK in method_dir.name
                or PARTIAL_MARK in request_dir.name or method_dir.name.startswith(".")):
            continue
        report.results_checked += 1
        try:
            outcome = UnlearningOutcome.read(result)
        except ResultError as exc:
            report.problems.append(f"{result}: not a result record: {exc}")
            continue
        if _check_model_file(run, outcome.model_path, outcome.model_digest, result, report):
            results[(request_dir.name, method_dir.name)] = outcome.model_digest
        if outcome.request_id != request_dir.name or outcome.method != method_dir.name:
            report.problems.append(
                f"{result}: it records request {outcome.request_id!r} and method "
                f"{outcome.method!r}; its directory says {request_dir.name}/{method_dir.name}"
            )
        row = ledger.get(request_dir.name)
        if row is None:
            report.problems.append(
                f"{result}: the withdrawal ledger has no request {request_dir.name}")
        elif row[2] not in ("done", "unlearning", "failed"):
            report.problems.append(
                f"{result}: the ledger says request {request_dir.name} of {row[1]} is "
                f"{row[2]!r}, yet this result is committed")
        rid = outcome.receipt.receipt_id if outcome.receipt is not None else None
        if rid is None:
            report.problems.append(f"{result}: it names no receipt")
        elif rid not in receipts:
            report.problems.append(f"{result}: its receipt {rid} is not a verified receipt in "
                                   f"{run.receipts}")
        else:
            named_receipts.add(rid)
            s = receipts[rid][1].statement
            pairs = [
                ("unlearned model", outcome.model_digest, s.unlearned_model),
                ("original model", outcome.original_model_digest, s.original_model),
                ("request", outcome.request_id, s.request_id),
                ("method", outcome.method, s.method),
                ("retrained model", outcome.reference.model_digest,
                 None if s.comparison is None else s.comparison.retrained_model_digest),
            ]
            for what, mine, signed in pairs:
                if mine != signed:
                    report.problems.append(
                        f"{result}: its {what} is {mine!r}; receipt {rid} says {signed!r}")
        forgotten = outcome.forgotten
        if outcome.reference.model_digest is not None:
            key = f"reference-{forget_key(forgotten)}"
            if key not in references:
                report.problems.append(
                    f"{result}: no cached reference {key} for the forgotten clients "
                    f"{', '.join(forgotten)}")
            elif outcome.reference.model_digest != references[key]:
                report.problems.append(
                    f"{result}: its reference model is {outcome.reference.model_digest!r}; "
                    f"the cached reference {key} is {references[key]}")
        if row is not None and row[1] not in forgotten:
            report.problems.append(
                f"{result}: request {request_dir.name} is {row[1]}'s, who is not among "
                f"the forgotten clients {', '.join(forgotten)}")
        if outcome.history_dir:
            _check_replayed_history(run.path / outcome.history_dir, result, report, nested)
    for rid, (path, _) in sorted(receipts.items()):
        if rid not in named_receipts:
            report.problems.append(
                f"receipt {path}: no committed result names it (a receipt for work that "
                "did not commit)")
    current = run.current
    if current.exists():
        info = _read_json(current, report)
        if info is not None:
            served = (str(info.get("request_id")), str(info.get("method")))
            if _check_model_file(run, info.get("model_path"), info.get("model_digest"), current,
                                 report) and results.get(served) != info.get("model_digest"):
                report.problems.append(
                    f"{current}: the model in service {info.get('model_digest')!r} is not the "
                    f"committed result of {served[0]}/{served[1]} ({results.get(served)!r})")


def _has_withdrawals(conn: sqlite3.Connection) -> bool:
    return conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'withdrawals'"
    ).fetchone() is not None


def audit_run_directory(
    path: Path,
    conn: sqlite3.Connection | None,
    wal: WalReport | None,
    report: VerifyReport,
    *,
    head: str | os.PathLike[str] | None = None,
    public_key: Ed25519PublicKey | str | os.PathLike[str] | None = None,
    verify_nested: Nested,
) -> None:
    """Run checks 1-4 of this module on ``path``, whose index is open (read-only) as
    ``conn``; add what is found to ``report``. ``verify_nested`` verifies a replayed
    history (a store inside a result) as a bare store."""
    if conn is None:
        return
    run = RunDirectory(path)
    trust = _Trust(run, public_key, report)
    has_receipts = run.receipts.is_dir() and any(run.receipts.glob("*.json"))
    try:
        _check_heads(run, conn, trust, report, head, has_receipts)
        if wal is not None and wal.torn_commit is not None:
            report.notes.append(
                f"{wal.torn_commit.describe(wal.path)}; no signed head covers more than the "
                "readable store, so it is a write that a crash interrupted before it committed"
                if not any("dropped" in p for p in report.problems)
                else wal.torn_commit.describe(wal.path)
            )
            if any("dropped" in p for p in report.problems):
                report.problems.append(
                    f"{wal.path}: the torn last commit frame held committed work (see the "
                    "dropped rounds or events above)")
        receipts = _check_receipts(run, conn, trust, report)
        _check_results(run, conn, receipts, report, verify_nested)
    except (sqlite3.Error, UnicodeError, FedForgetError) as exc:
        report.problems.append(f"index {run.index} is damaged: {exc}")
    partial = run.partial_dirs()
    if partial:
        report.notes.append(
            f"{len(partial)} staging director(ies) left by an interrupted command: "
            f"{', '.join(str(p) for p in partial[:3])} (not committed; ignored)")

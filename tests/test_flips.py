"""Single-byte flips in every kind of file of a run directory: each flip that changes
committed content is detected by `fedforget history verify`, with a message naming the file
(or the round or check).

Positions are sampled (a fixed seed: the first and last bytes of each file and spread
positions in between), not exhaustive. Whether a flip changed committed content is decided
by an oracle independent of fedforget's checks:

* the SQLite index and its WAL: what SQLite itself reads (a copy opened with plain
  ``sqlite3`` and dumped) differs from the original dump, or cannot be read;
* JSON files that are only partly committed (``result.json``, ``current.json``): a field that
  a digest or the receipt binds changed, or the file no longer parses;
* key files: the key they hold changed or no longer parses; salts: the salt's value changed;
* every other committed file (packs, model files, heads, receipts, ``receipts/latest``, the
  key manifest): every byte is content (each is hashed, signed or canonical).

``metrics.jsonl`` and ``client_evaluation.json`` are reports, not committed content: flipped
too, for the table, never required to be detected.

Set ``FEDFORGET_FLIP_TABLE=<file>`` to have the table written there, ``FEDFORGET_FLIPS`` and
``FEDFORGET_FLIP_SEED`` for a larger or another sample.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from trust_helpers import built_run, copy_run

from fedforget.history import HistoryStore, verify_store
from fedforget.history.heads import HeadLog
from fedforget.receipts.keys import load_private_key, public_key_from_pem, raw_public_key
from fedforget.receipts.run_keys import load_manifest, rotate_keys, run_signing_key
from fedforget.receipts.tree_head import TreeHead
from fedforget.withdrawal import WithdrawalLedger

pytestmark = pytest.mark.slow

# Sizes kept small for CI; FEDFORGET_FLIPS=<n> samples n positions per kind (4n for the
# SQLite files) and FEDFORGET_FLIP_SEED another sample, for a longer run.
PER_KIND = int(os.environ.get("FEDFORGET_FLIPS", "24"))
PER_INDEX = 4 * PER_KIND  # the SQLite files: most of a page is free space, so sample more
SEED = int(os.environ.get("FEDFORGET_FLIP_SEED", "11"))


def sqlite_dump(index: Path) -> list[str] | None:
    """What SQLite reads from ``index`` (and its -wal), from a scratch copy; None: unreadable."""
    scratch = index.parent.parent / f".oracle-{index.parent.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for suffix in ("", "-wal"):
        source = index.with_name(index.name + suffix)
        if source.exists():
            shutil.copyfile(source, scratch / (index.name + suffix))
    try:
        conn = sqlite3.connect(scratch / index.name)
        try:
            return list(conn.iterdump())
        finally:
            conn.close()
    except (sqlite3.Error, UnicodeDecodeError):  # unreadable (a flipped byte in a text)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def json_fields(keys: tuple[str, ...]) -> Callable[[Path], object]:
    def read(path: Path) -> object:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        out = []
        for key in keys:
            value: object = data
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            out.append(value)
        return out
    return read


def public_key_of(path: Path) -> object:
    try:
        return raw_public_key(public_key_from_pem(path.read_bytes()))
    except Exception:  # noqa: BLE001 - any failure to parse is "changed"
        return None


def private_key_of(path: Path) -> object:
    try:
        return raw_public_key(load_private_key(path).public_key())
    except Exception:  # noqa: BLE001
        return None


def head_of(path: Path) -> object:
    try:
        return TreeHead.from_json(path.read_bytes())
    except Exception:  # noqa: BLE001
        return None


def salt_of(path: Path) -> object:
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def whole_file(path: Path) -> object:
    return path.read_bytes()


def not_committed(path: Path) -> object:
    return "reports are not committed"


RESULT_FIELDS = ("model_path", "model_digest", "original_model_digest", "method",
                 "request.request_id", "reference.model_digest", "receipt.receipt_id",
                 "forgotten", "history_dir")


@dataclass
class Kind:
    name: str
    files: list[Path]
    content: Callable[[Path], object]
    names: tuple[str, ...]  # a problem naming one of these counts as naming the file
    committed: bool = True
    tried: int = 0
    detected: int = 0
    accepted_same: int = 0
    missed: list[str] = field(default_factory=list)


def kinds_of(run: Path) -> list[Kind]:
    unlearned = run / "unlearned"
    reference = next(unlearned.glob("reference-*"))
    result = next(p for p in unlearned.glob("*/*/result.json") if "reference-" not in str(p))
    index_names = ("history.sqlite", "round ", "withdrawal", "integrity_check")
    return [
        Kind("history.sqlite", [run / "history.sqlite"], lambda p: sqlite_dump(p),
             index_names),
        Kind("history.sqlite-wal", [run / "history.sqlite-wal"],
             lambda p: sqlite_dump(p.with_name("history.sqlite")), index_names),
        Kind("blobs/*.pack", sorted((run / "blobs").glob("*.pack")), whole_file,
             (".pack",)),
        Kind("tree_heads.jsonl", [run / "tree_heads.jsonl"], whole_file,
             ("tree_heads.jsonl",)),
        Kind("receipts/<id>.json", sorted((run / "receipts").glob("*.json")), whole_file,
             ("receipt",)),
        Kind("receipts/latest", [run / "receipts" / "latest"], whole_file, ("latest",)),
        Kind("unlearned/.../model.fft", [result.parent / "model.fft",
                                         reference / "model.fft"], whole_file, ("model file",)),
        Kind("unlearned/.../result.json", [result], json_fields(RESULT_FIELDS),
             ("result.json",)),
        Kind("reference result.json", [reference / "result.json"],
             json_fields(("forgotten", "model_digest", "model_path", "history_dir")),
             ("result.json",)),
        Kind("reference history.sqlite", [reference / "history" / "history.sqlite"],
             lambda p: sqlite_dump(p), ("replayed history",)),
        Kind("reference blobs/*.pack", sorted((reference / "history" / "blobs").glob("*.pack")),
             whole_file, ("replayed history",)),
        Kind("unlearned/current.json", [unlearned / "current.json"],
             json_fields(("request_id", "method", "model_path", "model_digest")),
             ("current.json",)),
        Kind("keys/signing.pub", [run / "keys" / "signing.pub"], public_key_of,
             ("signing.pub",)),
        Kind("keys/signing.key", [run / "keys" / "signing.key"], private_key_of,
             ("signing.key",)),
        Kind("keys/manifest.json", [run / "keys" / "manifest.json"], whole_file,
             ("manifest.json",)),
        Kind("client-state/*/head.json", sorted((run / "client-state").glob("*/head.json")),
             head_of, ("head.json",)),
        Kind("client-state/*/receipts/<id>.salt",
             sorted((run / "client-state").glob("*/receipts/*.salt")),
             salt_of, (".salt",)),
        Kind("metrics.jsonl", [run / "metrics.jsonl"], not_committed, (), committed=False),
        Kind("client_evaluation.json", [run / "client_evaluation.json"], not_committed, (),
             committed=False),
    ]


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared run, with the key rotated once (a manifest) and a withdrawal committed while
    a store holds the index open, so that the copy keeps a live WAL (as after a crash)."""
    base = copy_run(built_run(tmp_path_factory), tmp_path_factory.mktemp("flips") / "base")
    rotate_keys(base / "keys")
    key, _ = run_signing_key(base)
    store = HistoryStore.open(base)
    try:
        with WithdrawalLedger(base) as ledger:
            ledger.request("client-002", reason="moving", roster=frozenset(store.roster()))
        HeadLog(store, key, manifest=load_manifest(base / "keys"))
        run = copy_run(base, base.parent / "run")
    finally:
        store.close()
    assert (run / "history.sqlite-wal").stat().st_size > 32
    report = verify_store(run)
    assert report.ok, report.problems
    return run


def positions(size: int, count: int, rng: random.Random) -> list[int]:
    ends = [0, 1, 2, size - 2, size - 1]
    middle = rng.sample(range(3, max(4, size - 2)), k=min(max(0, count - len(ends)),
                                                          max(0, size - 5)))
    return sorted({p for p in ends + middle if 0 <= p < size})


def test_every_flip_of_committed_content_is_detected_and_named(flip_run: Path) -> None:
    rng = random.Random(SEED)
    kinds = kinds_of(flip_run)
    for kind in kinds:
        assert kind.files, f"the run has no {kind.name}"
        originals = {f: f.read_bytes() for f in kind.files}
        before = {f: kind.content(f) for f in kind.files}
        budget = PER_INDEX if "sqlite" in kind.name else PER_KIND
        per_file = max(3, budget // len(kind.files))
        for path in kind.files:
            data = originals[path]
            for offset in positions(len(data), per_file, rng):
                changed = bytearray(data)
                changed[offset] ^= 1 << (offset % 8)
                path.write_bytes(bytes(changed))
                try:
                    content_changed = kind.content(path) != before[path]
                    found = verify_store(flip_run).problems
                finally:
                    path.write_bytes(data)
                kind.tried += 1
                named = any(any(n in p for n in kind.names) for p in found)
                if found and (named or not kind.committed):
                    kind.detected += 1
                elif not content_changed or not kind.committed:
                    kind.accepted_same += 1
                else:
                    kind.missed.append(f"{path.name} byte {offset}: "
                                       + ("; ".join(found) or "verify said OK"))
    lines = ["| file kind | flips tried | detected | accepted (content unchanged) | "
             "accepted (content changed) |", "|---|---:|---:|---:|---:|"]
    for kind in kinds:
        label = kind.name + ("" if kind.committed else " (report, not committed)")
        lines.append(f"| {label} | {kind.tried} | {kind.detected} | {kind.accepted_same} | "
                     f"{len(kind.missed)} |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("FEDFORGET_FLIP_TABLE"):
        Path(os.environ["FEDFORGET_FLIP_TABLE"]).write_text(table + "\n")
    missed = [m for kind in kinds if kind.committed for m in kind.missed]
    assert not missed, "\n".join(missed)
    assert verify_store(flip_run).ok  # every byte restored

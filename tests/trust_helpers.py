"""A small trained-and-unlearned run directory for the verification tests, built once per
test process and copied by each test (``copy_run``)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import train_small

from fedforget.history import HistoryStore
from fedforget.history.heads import HeadLog
from fedforget.receipts.keys import load_private_key

_BUILT: dict[str, Path] = {}


def sign_current_head(run: Path) -> None:
    """What the server does after a ledger change: sign the store's head (HeadLog)."""
    key = load_private_key(run / "keys" / "signing.key")
    with HistoryStore.open(run) as store:
        HeadLog(store, key)


def built_run(factory: pytest.TempPathFactory) -> Path:
    """3 rounds, 4 clients; client-001 withdrawn and unlearned by retrain (result, receipt,
    salt, reference, current.json); the service signs a head after every ledger change, and
    once more here (a no-op when nothing changed)."""
    if "run" not in _BUILT:
        from fedforget.engine import run_unlearning

        out = factory.mktemp("trust") / "run"
        train_small(out)
        run_unlearning(out, client="client-001", method="retrain", progress=False)
        sign_current_head(out)
        _BUILT["run"] = out
    return _BUILT["run"]


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def sql(run: Path, statement: str, *args: object) -> None:
    """An edit made behind fedforget's back (what an attacker with the file can do)."""
    conn = sqlite3.connect(run / "history.sqlite")
    conn.execute(statement, args)
    conn.commit()
    conn.close()

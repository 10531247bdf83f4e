"""Serve one unlearning request end to end: check, record the withdrawal, run, read back.

Everything that can be refused is refused before anything is written: an unknown client,
an unknown method, a parameter out of range, a history whose retention dropped what the
method needs. A client with no stored contribution is a no-op (``None``), nothing written.
Then the withdrawal is recorded (or the existing one reused) and the ServerApp runs in
``unlearn`` mode on the chosen engine; see ``server/unlearning.py`` for what it writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedforget.config import RunConfig
from fedforget.engine import run_training
from fedforget.engine.apps import FlowerProject
from fedforget.history import HistoryStore
from fedforget.unlearning import UnlearningError, UnlearningRequest, get_method
from fedforget.unlearning.base import first_contribution
from fedforget.withdrawal import WithdrawalLedger


class _CheckingFederation:
    """Stands in for the federation while a method only checks a request: it knows the
    roster (the clients the run recorded) and refuses any work."""

    def __init__(self, roster: frozenset[str]) -> None:
        self.roster = tuple(sorted(roster))

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"a method's check() must not ask the federation for {name!r}")


def run_unlearning(
    directory: str | Path,
    *,
    client: str,
    method: str,
    params: Mapping[str, Any] | None = None,
    reason: str = "",
    engine: str = "inprocess",
    project: FlowerProject | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Forget ``client`` from the run in ``directory`` with ``method``; return result.json.

    Returns None (and writes nothing) when the client never contributed.
    """
    out = Path(directory).resolve()
    unlearner = get_method(method, params or {})
    with HistoryStore.open(out) as store:
        roster = frozenset(store.roster())
        if client not in roster:
            raise UnlearningError(
                f"unknown client {client!r}: this run's clients are "
                f"{', '.join(sorted(roster)) or 'none'}"
            )
        if first_contribution(store, [client]) is None:
            return None
        with WithdrawalLedger(out) as ledger:
            earlier = ledger.withdrawn()
        forget = (earlier | {client}) if unlearner.multi_client else frozenset({client})
        unlearner.check(
            UnlearningRequest(store=store, forget=forget, federation=_CheckingFederation(roster),
                              workdir="")
        )
        cfg = RunConfig.from_mapping(store.run_config)
    with WithdrawalLedger(out) as ledger:
        request, _ = ledger.request(client, reason=reason or "unlearn command", roster=roster)
    cfg = cfg.replace(
        out_dir=str(out), mode="unlearn", request_id=request.request_id, method=unlearner.name,
        method_params=json.dumps(unlearner.params.to_dict()), progress=progress,
    )
    run_training(cfg, engine=engine, project=project)
    result_path = out / "unlearned" / request.request_id / unlearner.name / "result.json"
    info: dict[str, Any] = json.loads(result_path.read_text())
    info["model_path"] = str(out / info["model_path"])
    info["result_path"] = str(result_path)
    info["receipt_path"] = info["receipt"]["receipt_path"]
    info["public_key_path"] = info["receipt"]["public_key_path"]
    return info

"""Run an experiment: train each grid point and seed once, unlearn with each method, report.

Layout of the output directory::

    <out>/experiment.json            the spec as run (and its fingerprint)
    <out>/runs/<run-id>-<hash>/      one training run per grid point and seed (a normal run
                                     directory: history, withdrawals, unlearned/, receipts/)
    <out>/cells/<cell-id>.json       one finished cell: the method's result.json + extras
    <out>/results.csv                one row per cell (rewritten after every cell)
    <out>/report.md, <out>/plots/    tables (mean ± std over seeds) and plots

Resuming: a cell whose file exists with the same fingerprint (its run config, method,
parameters, forget list, engine and metrics) is skipped. A killed run picks up where it
stopped: a training run resumes from its last complete round (the history store commits
rounds atomically), an unlearning that was cut short leaves no result and is run again
(results are written atomically), and the cell is only written after its result. Because
every step is seeded, the resumed experiment gives the same figures as an uninterrupted one
(wall times aside).

Every method of a training run starts from the trained model: before a method's first
request the runner clears the run's in-service pointer (``unlearned/current.json``), which
the previous method moved. With several clients in ``forget``, a method that forgets several
clients at once gets one request for all of them (the earlier ones recorded as pending
withdrawals); a method that forgets one client per request gets them one after another, each
starting from the previous result.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedforget.canonical import canonical_dumps
from fedforget.engine import run_training
from fedforget.engine.apps import FlowerProject, find_project
from fedforget.errors import FedForgetError
from fedforget.experiments.spec import Cell, ExperimentSpec, RunPoint
from fedforget.experiments.table import RESULTS_CSV, write_results_csv
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore
from fedforget.history.records import utc_now
from fedforget.results import ReferenceRecord, UnlearningOutcome
from fedforget.rundir import RESULT_FILE, RunDirectory

__all__ = ["ExperimentError", "read_cells", "run_experiment"]

CELLS = "cells"
RUNS = "runs"


class ExperimentError(FedForgetError):
    """An experiment could not be run (or its output directory belongs to another)."""


@dataclass
class _Progress:
    total: int
    stream: TextIO
    enabled: bool
    done: int = 0

    def say(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()


def run_experiment(
    spec: ExperimentSpec,
    out: str | Path,
    *,
    project: FlowerProject | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Run every cell of ``spec`` not yet finished in ``out``; return all cell records.

    Writes ``results.csv`` after each cell and, when ``report`` is true, ``report.md`` and
    the plots at the end.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    project = project or find_project()
    _write_json(out / "experiment.json", spec.to_dict() | {"fingerprint": spec.fingerprint})
    cells = spec.cells()
    shown = _Progress(total=len(cells), stream=stream or sys.stderr, enabled=progress)
    done = {c.cell_id: r for c in cells if (r := _finished(out, c, spec)) is not None}
    todo = [c for c in cells if c.cell_id not in done]
    shown.say(f"experiment {spec.name}: {len(cells)} cells ({len(spec.points())} trained "
              f"runs x {len(spec.methods)} methods); {len(done)} already "
              f"finished, {len(todo)} to run -> {out}")
    t_start = time.perf_counter()
    by_point: dict[str, list[Cell]] = {}
    for cell in todo:
        by_point.setdefault(cell.point.run_id, []).append(cell)
    index = {c.cell_id: i + 1 for i, c in enumerate(cells)}

    def in_order() -> list[dict[str, Any]]:
        return [done[c.cell_id] for c in cells if c.cell_id in done]

    for point_cells in by_point.values():
        point = point_cells[0].point
        run_dir = out / RUNS / run_dir_name(point)
        _train(spec, point, run_dir, project, shown, progress)
        for cell in point_cells:
            t0 = time.perf_counter()
            shown.say(f"[cell {index[cell.cell_id]}/{len(cells)}] {cell.cell_id}: "
                      f"{cell.method.method} unlearning {', '.join(spec.forget)} ...")
            record = _run_cell(spec, cell, run_dir, project, progress)
            _write_json(out / CELLS / f"{cell.cell_id}.json", record)
            done[cell.cell_id] = record
            write_results_csv(out, in_order())
            ran = len(done) - (len(cells) - len(todo))
            eta = (time.perf_counter() - t_start) / ran * (len(cells) - len(done))
            shown.say(f"[cell {index[cell.cell_id]}/{len(cells)}] {cell.cell_id}: "
                      f"{_summary_line(record)} ({time.perf_counter() - t0:.1f} s; "
                      f"{len(done)}/{len(cells)} done, eta {eta:.0f} s)")
    records = in_order()
    write_results_csv(out, records)
    if report:
        from fedforget.experiments.report import write_report

        path = write_report(out, spec, records)
        shown.say(f"report: {path}")
    shown.say(f"results: {out / RESULTS_CSV} ({len(records)} cells)")
    return records


# ------------------------------------------------------------------------ helpers
def run_dir_name(point: RunPoint) -> str:
    """``<run id>-<first 8 hex of the training config's SHA-256>``: an edited base config
    gets a fresh training run instead of clashing with the old one."""
    digest = hashlib.sha256(canonical_dumps(point.config.training_mapping())).hexdigest()
    return f"{point.run_id}-{digest[:8]}"


def cell_fingerprint(spec: ExperimentSpec, cell: Cell) -> str:
    """What a cell's result depends on (wall times aside)."""
    return hashlib.sha256(canonical_dumps({
        "training": cell.point.config.training_mapping(),
        "method": cell.method.method,
        "params": dict(cell.method.params),
        "forget": list(spec.forget),
        "engine": spec.engine,
        "metrics": list(spec.metrics),
        **spec.measurement(),
    })).hexdigest()


def _finished(out: Path, cell: Cell, spec: ExperimentSpec) -> dict[str, Any] | None:
    path = out / CELLS / f"{cell.cell_id}.json"
    if not path.exists():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: run it again (the file is replaced atomically)
    return record if record.get("fingerprint") == cell_fingerprint(spec, cell) else None


def read_cells(out: str | Path, spec: ExperimentSpec) -> list[dict[str, Any]]:
    """The finished cells of ``spec`` in ``out``, in the spec's cell order."""
    records = []
    for cell in spec.cells():
        record = _finished(Path(out), cell, spec)
        if record is not None:
            records.append(record)
    return records


def _train(spec: ExperimentSpec, point: RunPoint, run_dir: Path,
           project: FlowerProject, shown: _Progress, progress: bool) -> None:
    cfg = point.config
    if RunDirectory(run_dir).exists():
        with HistoryStore.open(run_dir) as store:
            if store.last_round >= cfg.num_rounds:
                return
            shown.say(f"[train {point.run_id}] resuming after round {store.last_round}")
    else:
        shown.say(f"[train {point.run_id}] {cfg.dataset}, {cfg.num_clients} clients, "
                  f"{cfg.num_rounds} rounds, {cfg.model}")
    run_training(cfg, out=run_dir, engine=spec.engine, project=project, progress=progress)


def _run_cell(spec: ExperimentSpec, cell: Cell, run_dir: Path, project: FlowerProject,
              progress: bool) -> dict[str, Any]:
    from fedforget.engine import run_unlearning
    from fedforget.unlearning import get_method
    from fedforget.withdrawal import WithdrawalLedger

    method = get_method(cell.method.method, cell.method.params)
    # every method starts from the trained model
    RunDirectory(run_dir).current.unlink(missing_ok=True)
    if method.multi_client:
        with HistoryStore.open(run_dir) as store:
            roster = frozenset(store.roster())
        with WithdrawalLedger(run_dir) as ledger:
            for client in spec.forget[:-1]:
                ledger.request(client, reason=f"experiment {spec.name}", roster=roster)
        requests: Sequence[str] = spec.forget[-1:]
    else:
        requests = spec.forget
    outcome: UnlearningOutcome | None = None
    t0 = time.perf_counter()
    for client in requests:
        outcome = run_unlearning(
            run_dir, client=client, method=method.name, params=dict(cell.method.params),
            reason=f"experiment {spec.name}", engine=spec.engine, project=project,
            progress=progress, reference=spec.reference,
            impact_clients=spec.impact_clients, shadow_attack=spec.shadow_attack,
        )
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {
        "cell_id": cell.cell_id,
        "fingerprint": cell_fingerprint(spec, cell),
        "experiment": spec.name,
        "run_id": cell.point.run_id,
        "run_dir": str(run_dir.relative_to(run_dir.parents[1])),
        "grid": dict(cell.point.grid),
        "seed": cell.point.seed,
        "label": cell.method.label,
        "method": cell.method.method,
        "params": dict(cell.method.params),
        "forget": list(spec.forget),
        "cell_seconds": wall,
        "finished_at": utc_now(),
    }
    if outcome is None:
        record["status"] = "no-op"
        record["result"] = None
        record["extra_metrics"] = {}
        return record
    record["status"] = "done"
    record["result"] = outcome.to_dict()  # paths in it are relative to the run directory
    record["extra_metrics"] = _extra_metrics(spec, cell, run_dir, outcome)
    return record


def _extra_metrics(spec: ExperimentSpec, cell: Cell, run_dir: Path,
                   outcome: UnlearningOutcome) -> dict[str, float]:
    if not spec.metrics:
        return {}
    from fedforget.data import ArrayDataset
    from fedforget.experiments.metrics import MetricContext, compute_metrics
    from fedforget.task import load_client_data, load_test_set, new_model
    from fedforget.tensors import decode

    cfg = cell.point.config
    with HistoryStore.open(run_dir) as store:
        original = store.global_model(store.last_round)
    unlearned = decode((run_dir / outcome.model_path).read_bytes())
    retrained = decode(_reference_model_path(run_dir, outcome).read_bytes())
    train_parts, holdout_parts = [], []
    for client in outcome.forgotten:
        partition = int(client.rsplit("-", 1)[1])
        train, holdout = load_client_data(cfg, partition)
        train_parts.append(train)
        holdout_parts.append(holdout)

    def pooled(parts: list[ArrayDataset], name: str) -> ArrayDataset:
        return ArrayDataset(x=np.concatenate([p.x for p in parts]),
                            y=np.concatenate([p.y for p in parts]),
                            num_classes=parts[0].num_classes, name=name)

    ctx = MetricContext(
        config=cfg, model=new_model(cfg), original=original, unlearned=unlearned,
        retrained=retrained, test_set=load_test_set(cfg),
        forgotten=pooled(train_parts, "forgotten"), holdout=pooled(holdout_parts, "holdout"),
        result=outcome.to_dict(),
    )
    return compute_metrics(spec.metrics, ctx)


def _reference_model_path(run_dir: Path, outcome: UnlearningOutcome) -> Path:
    directory = RunDirectory(run_dir).reference_dir(outcome.forgotten)
    if outcome.reference.model_digest is None or not (directory / RESULT_FILE).exists():
        raise ExperimentError(f"{run_dir}: the result of {outcome.method} has no retrained "
                              "reference (an experiment's metrics need one)")
    record = ReferenceRecord.read(directory / RESULT_FILE)
    if record.model_digest != outcome.reference.model_digest:
        raise ExperimentError(f"{directory}: the cached reference has digest "
                              f"{record.model_digest}, the result names "
                              f"{outcome.reference.model_digest}")
    return directory / record.model_path


def _summary_line(record: Mapping[str, Any]) -> str:
    if record["status"] != "done":
        return "no-op (the client never contributed)"
    m = record["result"]["metrics"]
    cost = record["result"]["cost"]
    acc = m.get("test_accuracy") or {}
    parts = [f"test acc {acc.get('unlearned', float('nan')):.4f}"
             + (f" (retrained {acc['retrained']:.4f})" if "retrained" in acc else "")]
    if m.get("backdoor_success"):
        parts.append(f"backdoor {m['backdoor_success']['unlearned']:.3f}")
    parts.append(f"{cost['client_epochs']:g} client-epochs")
    return ", ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))

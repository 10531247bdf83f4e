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

import contextlib
import csv
import hashlib
import io
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
from fedforget.fileio import write_atomic
from fedforget.history import HistoryStore
from fedforget.history.records import utc_now

__all__ = ["ExperimentError", "flatten_cell", "read_cells", "run_experiment"]

CELLS = "cells"
RUNS = "runs"
RESULTS_CSV = "results.csv"


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
    cfg = point.config.replace(out_dir=str(run_dir), progress=progress)
    if (run_dir / "history.sqlite").exists():
        with HistoryStore.open(run_dir) as store:
            if store.last_round >= cfg.num_rounds:
                return
            shown.say(f"[train {point.run_id}] resuming after round {store.last_round}")
    else:
        shown.say(f"[train {point.run_id}] {cfg.dataset}, {cfg.num_clients} clients, "
                  f"{cfg.num_rounds} rounds, {cfg.model}")
    run_training(cfg, engine=spec.engine, project=project)


def _run_cell(spec: ExperimentSpec, cell: Cell, run_dir: Path, project: FlowerProject,
              progress: bool) -> dict[str, Any]:
    from fedforget.engine.unlearning import run_unlearning
    from fedforget.unlearning import get_method
    from fedforget.withdrawal import WithdrawalLedger

    method = get_method(cell.method.method, cell.method.params)
    pointer = run_dir / "unlearned" / "current.json"
    pointer.unlink(missing_ok=True)  # every method starts from the trained model
    if method.multi_client:
        with HistoryStore.open(run_dir) as store:
            roster = frozenset(store.roster())
        with WithdrawalLedger(run_dir) as ledger:
            for client in spec.forget[:-1]:
                ledger.request(client, reason=f"experiment {spec.name}", roster=roster)
        requests: Sequence[str] = spec.forget[-1:]
    else:
        requests = spec.forget
    info: dict[str, Any] | None = None
    t0 = time.perf_counter()
    for client in requests:
        info = run_unlearning(
            run_dir, client=client, method=method.name, params=dict(cell.method.params),
            reason=f"experiment {spec.name}", engine=spec.engine, project=project,
            progress=progress,
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
    if info is None:
        record["status"] = "no-op"
        record["result"] = None
        record["extra_metrics"] = {}
        return record
    record["status"] = "done"
    record["result"] = _portable(info, run_dir)
    record["extra_metrics"] = _extra_metrics(spec, cell, run_dir, info)
    return record


def _portable(info: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """The result without absolute paths (so that a moved output directory still reads)."""
    out = dict(info)
    for key in ("model_path", "result_path", "receipt_path", "public_key_path"):
        if isinstance(out.get(key), str) and Path(out[key]).is_absolute():
            with contextlib.suppress(ValueError):  # a path outside the run: left as it is
                out[key] = str(Path(out[key]).relative_to(run_dir))
    return out


def _extra_metrics(spec: ExperimentSpec, cell: Cell, run_dir: Path,
                   info: Mapping[str, Any]) -> dict[str, float]:
    if not spec.metrics:
        return {}
    from fedforget.data import ArrayDataset
    from fedforget.experiments.metrics import MetricContext, compute_metrics
    from fedforget.task import load_client_data, load_test_set, new_model
    from fedforget.tensors import decode

    cfg = cell.point.config
    with HistoryStore.open(run_dir) as store:
        original = store.global_model(store.last_round)
    unlearned = decode((run_dir / info["model_path"]).read_bytes())
    retrained = decode(_reference_model_path(run_dir, info).read_bytes())
    train_parts, holdout_parts = [], []
    for client in info["forgotten"]:
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
        result=info,
    )
    return compute_metrics(spec.metrics, ctx)


def _reference_model_path(run_dir: Path, info: Mapping[str, Any]) -> Path:
    digest = info["reference"]["model_digest"]
    for result in sorted((run_dir / "unlearned").glob("reference-*/result.json")):
        ref = json.loads(result.read_text())
        if ref.get("model_digest") == digest:
            return result.parent / ref["model_path"]
    raise ExperimentError(f"{run_dir}: no cached reference model with digest {digest}")


def _summary_line(record: Mapping[str, Any]) -> str:
    if record["status"] != "done":
        return "no-op (the client never contributed)"
    m = record["result"]["metrics"]
    cost = record["result"]["cost"]
    parts = [f"test acc {m['test_accuracy']['unlearned']:.4f} "
             f"(retrained {m['test_accuracy']['retrained']:.4f})"]
    if m.get("backdoor_success"):
        parts.append(f"backdoor {m['backdoor_success']['unlearned']:.3f}")
    parts.append(f"{cost['client_epochs']:g} client-epochs")
    return ", ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))


# --------------------------------------------------------------------- results table
_SKIP = frozenset({"trace", "client_accuracy", "changes", "worst"})


def flatten_cell(record: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: identifiers, grid values, then every scalar figure of the result."""
    row: dict[str, Any] = {
        "cell_id": record["cell_id"],
        "experiment": record["experiment"],
        **{k: v for k, v in record["grid"].items()},
        "seed": record["seed"],
        "label": record["label"],
        "method": record["method"],
        "forget": " ".join(record["forget"]),
        "status": record["status"],
    }
    result = record.get("result")
    if result:
        row["exact"] = result.get("exact")
        row["bit_identical_to_retrained"] = result.get("reference", {}).get("bit_identical")
        row["model_digest"] = result.get("model_digest")
        _flatten(result.get("metrics", {}), "", row)
        _flatten(result.get("cost", {}), "cost_", row)
        _flatten(result.get("reference", {}).get("cost", {}), "retrain_cost_", row)
    row.update(record.get("extra_metrics", {}))
    row["cell_seconds"] = record.get("cell_seconds")
    return row


def _flatten(obj: Mapping[str, Any], prefix: str, row: dict[str, Any]) -> None:
    for key, value in obj.items():
        if key in _SKIP:
            continue
        if isinstance(value, Mapping):
            _flatten(value, f"{prefix}{key}_", row)
        else:
            _put(row, f"{prefix}{key}", value)


def _put(row: dict[str, Any], key: str, value: Any) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        row[key] = value


def write_results_csv(out: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``results.csv`` (one row per record, in order) atomically; return its path."""
    rows = [flatten_cell(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_atomic(Path(out) / RESULTS_CSV, text.getvalue())

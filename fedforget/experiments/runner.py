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
the previous method moved. With several clients in ``forget``, every withdrawal is recorded
before any is served (so no leaving client is asked to train for another's request); a method
that forgets several clients at once gets one request for all of them; a method that forgets
one client per request gets them one after another, each starting from the previous result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    workers: int = 1,
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of ``spec`` not yet finished in ``out``; return all cell records.

    Writes ``results.csv`` after each cell (with ``workers`` or ``ray_address``: after
    each training run's cells) and, when ``report`` is true, ``report.md`` and the plots at
    the end.

    Parallel runs: the cells of one training run share its run directory (its withdrawal
    ledger, receipt chain, cached reference), so they run one after another, in the spec's
    order, exactly as in a serial run; different training runs are independent and run
    in ``workers`` processes of this machine, or as tasks of the Ray cluster at
    ``ray_address`` (every node must see ``out`` at the same path and have fedforget and
    the app installed). Each cell is seeded as in a serial run, so the results (model
    digests included) are the same, wall times aside.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise ExperimentError(f"workers = {workers!r}; expected an integer >= 1")
    project = project or find_project()
    _write_json(out / "experiment.json", spec.to_dict() | {"fingerprint": spec.fingerprint})
    cells = spec.cells()
    shown = _Progress(total=len(cells), stream=stream or sys.stderr, enabled=progress)
    done = {c.cell_id: r for c in cells if (r := _finished(out, c, spec)) is not None}
    todo = [c for c in cells if c.cell_id not in done]
    by_point: dict[str, list[Cell]] = {}
    for cell in todo:
        by_point.setdefault(cell.point.run_id, []).append(cell)
    where = (f"the Ray cluster at {ray_address}" if ray_address else
             f"{workers} worker processes" if workers > 1 else "this process")
    shown.say(f"experiment {spec.name}: {len(cells)} cells ({len(spec.points())} trained "
              f"runs x {len(spec.methods)} methods); {len(done)} already "
              f"finished, {len(todo)} to run in {where} -> {out}")

    def in_order() -> list[dict[str, Any]]:
        return [done[c.cell_id] for c in cells if c.cell_id in done]

    index = {c.cell_id: i + 1 for i, c in enumerate(cells)}
    jobs = [_PointJob(spec=spec, cells=tuple(point_cells), out=out, project=project,
                      progress=progress, total=len(cells),
                      index={c.cell_id: index[c.cell_id] for c in point_cells})
            for point_cells in by_point.values()]
    t_start = time.perf_counter()
    finished_jobs: Iterable[tuple[_PointJob, list[tuple[str, Any]]]]
    if ray_address is not None:
        finished_jobs = _on_ray(jobs, ray_address)
    elif workers > 1 and len(jobs) > 1:
        finished_jobs = _in_processes(jobs, workers)
    else:
        session = _simulation_session(spec)
        finished_jobs = _in_this_process(jobs, session, done, in_order)
    for number, (job, job_records) in enumerate(finished_jobs, start=1):
        for cell_id, record in job_records:
            done[cell_id] = record
        write_results_csv(out, in_order())
        if len(jobs) > 1 and (workers > 1 or ray_address is not None):
            elapsed = time.perf_counter() - t_start
            eta = elapsed / number * (len(jobs) - number)
            shown.say(f"[run {number}/{len(jobs)}] {job.cells[0].point.run_id}: "
                      f"{len(job_records)} cells finished ({len(done)}/{len(cells)} done, "
                      f"{elapsed:.0f} s, eta {eta:.0f} s)")
    records = in_order()
    write_results_csv(out, records)
    if report:
        from fedforget.experiments.report import write_report

        path = write_report(out, spec, records)
        shown.say(f"report: {path}")
    shown.say(f"results: {out / RESULTS_CSV} ({len(records)} cells)")
    return records


@dataclass(frozen=True)
class _PointJob:
    """One training run and its cells: the unit of parallel work."""

    spec: ExperimentSpec
    cells: tuple[Cell, ...]
    out: Path
    project: FlowerProject
    progress: bool
    index: Mapping[str, int]  # cell id -> its number among all the experiment's cells
    total: int


def _run_point(job: _PointJob, after_cell: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """Train the job's run (or resume it) and run its cells in order; each cell's file is
    written as soon as it is finished. ``after_cell(cell_id, record)`` is called after each."""
    spec, out = job.spec, job.out
    shown = _Progress(total=job.total, stream=sys.stderr, enabled=job.progress)
    point = job.cells[0].point
    run_dir = out / RUNS / run_dir_name(point)
    _train(spec, point, run_dir, job.project, shown, job.progress)
    records = []
    for cell in job.cells:
        t0 = time.perf_counter()
        number = job.index[cell.cell_id]
        shown.say(f"[cell {number}/{job.total}] {cell.cell_id}: "
                  f"{cell.method.method} unlearning {', '.join(spec.forget)} ...")
        record = _run_cell(spec, cell, run_dir, job.project, job.progress)
        _write_json(out / CELLS / f"{cell.cell_id}.json", record)
        records.append((cell.cell_id, record))
        if after_cell is not None:
            after_cell(cell.cell_id, record)
        shown.say(f"[cell {number}/{job.total}] {cell.cell_id}: {_summary_line(record)} "
                  f"({time.perf_counter() - t0:.1f} s)")
    return records


def _in_this_process(jobs: list[_PointJob], session: Any, done: dict[str, Any],
                     in_order: Any) -> list[tuple[_PointJob, list[tuple[str, Any]]]]:
    """Every job here, one after another (results.csv rewritten after each cell)."""
    def after_cell(cell_id: str, record: dict[str, Any]) -> None:
        done[cell_id] = record
        write_results_csv(jobs[0].out, in_order())

    with session:
        return [(job, _run_point(job, after_cell)) for job in jobs]


def _worker(job: _PointJob) -> list[tuple[str, dict[str, Any]]]:
    """A worker process's (or Ray task's) part: import the spec's plug-ins, run the job."""
    import importlib

    for module in job.spec.imports:
        importlib.import_module(module)
    with _simulation_session(job.spec):
        return _run_point(job)


def _in_processes(jobs: list[_PointJob], workers: int
                  ) -> Iterator[tuple[_PointJob, list[tuple[str, Any]]]]:
    """The jobs in ``workers`` fresh processes (spawned: no state inherited), yielded as
    they finish; the first failure is raised once the others have stopped."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        pending = {pool.submit(_worker, job): job for job in jobs}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                try:
                    records = future.result()
                except BaseException:
                    for other in pending:
                        other.cancel()
                    raise
                yield job, records


def _on_ray(jobs: list[_PointJob], address: str
            ) -> Iterator[tuple[_PointJob, list[tuple[str, Any]]]]:
    """The jobs as tasks of the Ray cluster at ``address`` (one CPU each), yielded as they
    finish."""
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    task = ray.remote(num_cpus=1)(_worker)
    pending = {task.remote(job): job for job in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            yield job, ray.get(ready[0])
    finally:
        for ref in pending:
            ray.cancel(ref)
        if connected_here:
            ray.shutdown()


def _simulation_session(spec: ExperimentSpec) -> Any:
    """One SuperLink and Ray cluster for every run of a simulation experiment (in this
    process); nothing for the in-process engine."""
    if spec.engine != "simulation":
        return contextlib.nullcontext()
    from fedforget.engine.simulation import simulation_session

    return simulation_session()


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
    # every withdrawal of the experiment is recorded before any is served: a method that
    # forgets one client per request must not ask a client that is leaving too
    with HistoryStore.open(run_dir) as store:
        roster = frozenset(store.roster())
    with WithdrawalLedger(run_dir) as ledger:
        for client in spec.forget[:-1]:
            ledger.request(client, reason=f"experiment {spec.name}", roster=roster)
    requests: Sequence[str] = spec.forget[-1:] if method.multi_client else spec.forget
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
    directory = RunDirectory(run_dir).reference_dir(outcome.reference_key())
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

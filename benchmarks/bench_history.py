"""Training with history recording vs without, on the in-process engine.

The same run (the issue-2 demo, ``_common.BENCH_CONFIG``, 20 rounds by default) on the
in-process engine, in five variants, run interleaved (rotating order) after a warm-up:

* ``no recording``: ``HistoryStore.commit_round`` replaced by a no-op and no tree heads
  signed (BENCHMARK-LOCAL PATCH, ``_common.no_store_writes``): the baseline. Everything
  else of the engine runs, including what ``HistoryRecording`` does before a commit (reply
  validation, the updates Δ, the digest of the new global model), so the ratio isolates
  the recording: the store's commits (encoding, hashing, writing blobs, fsyncs, the SQLite
  transaction) and, since the erasure receipts, the signed tree head after each round
  (Merkle append, Ed25519 signature, an fsynced append to ``tree_heads.jsonl``, and each
  client writing the head it receives);
* ``store, fsync off``: the real store without fsync, by the run-config key
  ``history-fsync = false`` (on code from before that key, by a BENCHMARK-LOCAL PATCH of the
  default of ``HistoryStore.create``'s ``fsync``, ``_common.store_without_fsync``); the
  tree heads' own fsync stays;
* ``store, fsync on``: the real store as ``fedforget train`` runs it (fsync on): the
  default, on which the goal is judged;
* ``store, fsync on, no tree heads``: the same without the tree heads
  (BENCHMARK-LOCAL PATCH, ``_common.no_tree_heads``), to tell the two costs apart;
* ``store, fsync on, no writer thread``: the same with ``background_commit=False``
  (BENCHMARK-LOCAL PATCH of the default of ``HistoryRecording``'s ``background_commit``,
  ``_common.commits_on_main_thread``): each commit on the round's critical path, for
  comparison with the writer thread.

Commits run on the wrapper's background writer thread; the run's wall time includes the
final ``flush`` (waiting for every commit), so a writer that falls behind shows up. A second,
instrumented pass reports the writer's own time per commit and the wait at the end, and the
CPU time (thread clocks around the calls) spent inside the recording code: the store's
``write_round`` and ``prepare_round``, the server's ``HeadLog.on_commit`` / ``config`` and
the clients' ``_keep_tree_head``; their sum against the baseline's CPU per round is an
estimate of the CPU ratio that does not difference two noisy totals (it leaves out indirect
costs). A micro-measurement reports this disk's fsync latency (the main factor).

Two more measurements follow: the cost of one tree-head signature after 100 and after
10,000 signed heads (it should not grow), and recording's fixed cost with local training
stubbed (BENCHMARK-LOCAL PATCH, ``_common.stubbed_training``), split by thread: the
training thread's own CPU, the writer's, and the training thread's context switches, with
and without the writer thread (training noise left out: what is left is the engine, the
store and their interplay).

Goal (issue 2): a training round with history recording costs <= 5 % more than without.

Usage: ``python benchmarks/bench_history.py [--quick] [--rounds R] [--repetitions N]
[--dir DIR] [--set key=value ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    commits_on_main_thread,
    demo_config,
    describe,
    environment,
    interleave,
    no_store_writes,
    no_tree_heads,
    project,
    scratch_dir,
    store_without_fsync,
    stubbed_training,
    timed_calls,
    train,
)

from fedforget.arrays import model_tensors
from fedforget.config import RunConfig, parse_assignments
from fedforget.history import HistoryStore, ParticipantUpdate
from fedforget.task import new_model

GOAL = 1.05
STORE_FORMAT = getattr(sys.modules["fedforget.history.store"], "FORMAT_VERSION", 1)
FSYNC_KEY = "history-fsync"
BASELINE = "no recording"


def fsync_latency(directory: Path, *, size: int, count: int) -> tuple[float, float]:
    """Median seconds of (write ``size`` bytes + fsync the file, fsync its directory)."""
    data = os.urandom(size)
    file_times: list[float] = []
    dir_times: list[float] = []
    for i in range(count):
        path = directory / f"fsync-probe-{i}"
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        middle = time.perf_counter()
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        file_times.append(middle - start)
        dir_times.append(time.perf_counter() - middle)
        path.unlink()
    return statistics.median(file_times), statistics.median(dir_times)


def signing_growth(directory: Path, *, heads: tuple[int, ...], window: int = 50
                   ) -> dict[int, float]:
    """Median CPU seconds (thread clock) of one signed tree head after each of ``heads``
    heads were signed, over ``window`` signatures there.

    The head log of a store with one committed round signs one head per further record
    (``HeadLog.on_commit`` with a synthetic record of a round record's size: the
    signature does not look inside it), with fsync as ``fedforget train`` runs it. The
    cost of a signature should not grow with the heads signed before it.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedforget.history.heads import HeadLog

    class Record:  # what on_commit reads of a round record
        def __init__(self, t: int) -> None:
            self.data = b"r" * 3000 + str(t).encode()

        def canonical_bytes(self) -> bytes:
            return self.data

    store = HistoryStore.create(directory, run_config={"bench": True})
    try:
        store.set_roster(["client-000"])
        model = {"w": np.zeros(3, np.float32)}
        before = store.put_initial_model(model)
        store.commit_round(round=1, global_before=before, global_after=model, config={},
                           participants=[ParticipantUpdate("client-000", 1, 1.0, 0, model)])
        log = HeadLog(store, Ed25519PrivateKey.generate())
        signed, found = 1, {}
        for target in sorted(heads):
            while signed < target:
                log.on_commit(Record(signed))  # type: ignore[arg-type]
                signed += 1
            times = []
            for _ in range(window):
                cpu = time.thread_time()
                log.on_commit(Record(signed))  # type: ignore[arg-type]
                times.append(time.thread_time() - cpu)
                signed += 1
            found[target] = statistics.median(times)
    finally:
        store.close()
    return found


def _voluntary_switches() -> int:
    """Voluntary context switches of the calling thread so far (Linux; 0 elsewhere)."""
    import threading

    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fixed_cost_by_thread(
    variants: dict[str, Any], *, run: Any, rounds: int, repetitions: int
) -> dict[str, dict[str, float]]:
    """Recording's cost with local training stubbed (``_common.stubbed_training``), split by
    thread: per round, the process CPU, the calling (training) thread's CPU, the CPU inside
    the writer thread's ``HistoryRecording._write`` (thread clock), wall time, and the
    training thread's voluntary context switches. Medians over ``repetitions``
    interleaved runs of ``rounds`` rounds; ``variants`` maps a name to a context manager
    factory, ``run(name)`` trains one run inside it."""
    from fedforget.strategies.history import HistoryRecording as recording

    inside = [0.0]
    original = recording.__dict__["_write"]

    def timed_write(self: Any, prepared: Any) -> Any:
        cpu = time.thread_time()
        try:
            return original(self, prepared)
        finally:
            inside[0] += time.thread_time() - cpu

    samples: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}

    def measured(name: str) -> Any:
        def one() -> None:
            inside[0] = 0.0
            switches = _voluntary_switches()
            process, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
            with variants[name]():
                run(name)
            samples[name].append((
                time.process_time() - process, time.thread_time() - thread,
                inside[0], time.perf_counter() - wall, float(_voluntary_switches() - switches)))
        return one

    runs = {name: measured(name) for name in variants}
    recording._write = timed_write
    try:
        with stubbed_training():
            for one in runs.values():  # warm-up
                one()
            for rows in samples.values():
                rows.clear()
            interleave(runs, repetitions=repetitions, verbose=False)
    finally:
        recording._write = original
    keys = ("process cpu", "training thread cpu", "writer cpu", "wall", "switches")
    return {name: {k: statistics.median(s[i] for s in rows) / rounds
                   for i, k in enumerate(keys)} for name, rows in samples.items()}


def commit_alone(
    directory: Path, cfg: Any, *, fsync: bool, rounds: int
) -> float:
    """Median seconds of one ``commit_round`` of a demo-sized round, with nothing else running.

    The round has the demo's shapes: the global model and one update per client (random
    values; the cost does not depend on them).
    """
    rng = np.random.default_rng(0)
    model = model_tensors(new_model(cfg))
    store = HistoryStore.create(directory, run_config={"bench": True}, fsync=fsync)
    times: list[float] = []
    try:
        before = store.put_initial_model(model)
        for t in range(1, rounds + 1):
            after = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}
            participants = [
                ParticipantUpdate(
                    client_id=f"client-{i:03d}",
                    num_examples=100,
                    weight=1 / cfg.num_clients,
                    seed=i,
                    update={
                        k: rng.standard_normal(v.shape).astype(np.float32)
                        for k, v in model.items()
                    },
                )
                for i in range(cfg.num_clients)
            ]
            start = time.perf_counter()
            record = store.commit_round(
                round=t, global_before=before, global_after=after,
                participants=participants, config={"local-epochs": 2},
            )
            times.append(time.perf_counter() - start)
            before = record.global_after
    finally:
        store.close()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 2 repetitions")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 20)")
    parser.add_argument("--repetitions", type=int, default=None, help="default 15")
    parser.add_argument("--dir", default=None, help="run directories go here (default $TMPDIR)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides of _common.BENCH_CONFIG")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 20)
    repetitions = args.repetitions or (2 if args.quick else 15)
    overrides = parse_assignments(args.set)
    if args.dir:
        tempfile.tempdir = args.dir

    torch.set_num_threads(1)
    proj = project()
    proj.load()
    from fedforget.strategies.history import HistoryRecording as recording

    with scratch_dir("fedforget-bench-history-") as scratch:
        counter = itertools.count()

        def fresh_cfg(**extra: Any) -> Any:
            return demo_config(num_rounds=rounds, **{**overrides, **extra})

        def run(cfg: Any) -> None:
            train(cfg, scratch / f"run-{next(counter)}", project=proj)

        def no_writes() -> None:
            with no_store_writes():
                run(fresh_cfg())

        def fsync_off() -> None:
            known_keys = RunConfig.keys()  # a tuple of kebab-case names
            if FSYNC_KEY in known_keys:
                run(fresh_cfg(**{FSYNC_KEY: False}))
            else:  # code from before the run-config key
                with store_without_fsync():
                    run(fresh_cfg())

        def fsync_on() -> None:
            run(fresh_cfg())

        def fsync_on_no_heads() -> None:
            with no_tree_heads():
                run(fresh_cfg())

        def fsync_on_sync() -> None:
            with commits_on_main_thread():
                run(fresh_cfg())

        variants = {
            BASELINE: no_writes,
            "store, fsync off": fsync_off,
            "store, fsync on": fsync_on,
            "store, fsync on, no tree heads": fsync_on_no_heads,
            "store, fsync on, no writer thread": fsync_on_sync,
        }
        for variant in variants.values():  # warm-up
            variant()
        timings = interleave(variants, repetitions=repetitions)

        # Instrumented pass: the writer thread's time per commit and the wait at the end.
        writer: dict[str, list[tuple[float, float, float, float]]] = {}
        # CPU time (thread clocks) inside the recording code, per instrumented run.
        inside: dict[str, list[dict[str, float]]] = {}
        sizes: dict[str, int] = {}
        heads = sys.modules.get("fedforget.history.heads")
        client_mod = sys.modules.get("fedforget.clients.mod")
        for _ in range(max(2, repetitions // 3)):
            for name, variant in (("store, fsync off", fsync_off), ("store, fsync on", fsync_on)):
                # Since store format 2 the wrapper calls prepare_round (training thread) and
                # write_round (writer thread) instead of commit_round (writer thread).
                targets = [(HistoryStore, "commit_round", "commit"),
                           (HistoryStore, "write_round", "write"),
                           (HistoryStore, "prepare_round", "prepare"),
                           (recording, "flush", "flush"), (os, "fsync", "fsync")]
                if heads is not None and hasattr(heads, "HeadLog"):
                    targets += [(heads.HeadLog, "on_commit", "heads"),
                                (heads.HeadLog, "config", "head config")]
                if client_mod is not None:
                    targets.append((client_mod, "_keep_tree_head", "head saves"))
                with timed_calls(targets) as t:
                    variant()
                writer.setdefault(name, []).append(
                    (t["commit"] + t["write"], t["flush"], t["fsync calls"], t["prepare"])
                )
                inside.setdefault(name, []).append({
                    "store: write_round (writer thread)": t["commit cpu"] + t["write cpu"],
                    "store: prepare_round": t["prepare cpu"],
                    "tree heads: signing (server)": t["heads cpu"] + t["head config cpu"],
                    "tree heads: saving (clients)": t["head saves cpu"],
                })
        with HistoryStore.open(scratch / f"run-{next(counter) - 1}") as store:
            summary = store.summary()
            updates = sum(len(r) for r in summary["clients"].values())
            sizes = {"model": summary["model_bytes"] // (rounds + 1),
                     "update": summary["update_bytes"] // max(1, updates)}
        probe = scratch / "probe"
        probe.mkdir()
        file_fsync, dir_fsync = fsync_latency(probe, size=sizes["model"], count=30)
        alone = {
            flag: commit_alone(scratch / f"alone-{flag}", fresh_cfg(), fsync=flag, rounds=20)
            for flag in (False, True)
        }
        growth = signing_growth(scratch / "heads", heads=(100, 1000 if args.quick else 10_000))
        fixed_rounds = 5 if args.quick else 40
        fixed = fixed_cost_by_thread(
            {BASELINE: no_store_writes, "store, fsync on": contextlib.nullcontext,
             "store, fsync on, no writer thread": commits_on_main_thread},
            run=lambda name: train(demo_config(num_rounds=fixed_rounds, **overrides),
                                   scratch / f"fixed-{next(counter)}", project=proj),
            rounds=fixed_rounds, repetitions=2 if args.quick else 8)

    print(f"bench_history: history recording vs none, in-process engine ({environment()})")
    print(
        f"config: issue-2 demo ({describe(demo_config(num_rounds=rounds, **overrides))}), "
        f"{rounds} rounds"
        + (f", overrides {overrides}" if overrides else "")
        + f"; {repetitions} interleaved repetitions after one warm-up run of each variant; "
        f"run directories under {Path(scratch).parent}"
    )
    print()
    print("time per training round = run wall time (incl. the final flush) / rounds;")
    print("ratio = median / median of 'no recording'; paired = within each repetition")
    print(timings.table(per=rounds, unit="ms", baseline=BASELINE))
    print()
    print("process CPU time per round, same runs (all threads incl. the writer; less disturbed")
    print("by other load, blind to fsync waits)")
    assert timings.cpu is not None
    print(timings.cpu.table(per=rounds, unit="ms", baseline=BASELINE))
    print()
    print("writer thread, per round (median over instrumented runs): wall time inside")
    print("write_round (commit_round on older code); wait in flush() at the end of the run /")
    print("rounds; os.fsync calls of the whole run, by any code, / rounds (SQLite's own fsyncs")
    print("not counted); training thread: wall time inside prepare_round (format 2)")
    for name, values in writer.items():
        commit = statistics.median(v[0] for v in values) / rounds * 1e3
        flush = statistics.median(v[1] for v in values) / rounds * 1e3
        fsyncs = statistics.median(v[2] for v in values) / rounds
        prepare = statistics.median(v[3] for v in values) / rounds * 1e3
        print(f"  {name:<16} write {commit:6.1f} ms; flush wait {flush:5.1f} ms; "
              f"{fsyncs:4.1f} os.fsync; prepare_round {prepare:5.1f} ms")
    print(
        "commit_round alone (same sizes, nothing else running; median of 20 commits): "
        f"fsync off {alone[False] * 1e3:.1f} ms, fsync on {alone[True] * 1e3:.1f} ms"
    )
    print(
        f"blobs per round: 1 global model (~{sizes['model']} B) + 1 update per client "
        f"(~{sizes['update']} B), "
        + ("each blob a file: fsync on = 1 file fsync per blob + 1 fsync per blob directory "
           "touched + SQLite's WAL fsync" if STORE_FORMAT < 2 else
           "all in one pack file per round: fsync on = 1 pack fsync + 1 fsync of its "
           "directory + SQLite's WAL fsync")
    )
    print(
        f"this disk: write {sizes['model']} B + fsync {file_fsync * 1e3:.2f} ms, directory "
        f"fsync {dir_fsync * 1e3:.2f} ms (median of 30)"
    )
    (few, few_cpu), (many, many_cpu) = sorted(growth.items())
    print(
        f"one signed tree head (HeadLog.on_commit, fsync on), thread CPU, median of 50: after "
        f"{few:,} heads {few_cpu * 1e3:.3f} ms, after {many:,} heads {many_cpu * 1e3:.3f} ms: "
        f"ratio {many_cpu / few_cpu:.2f} (it should not grow with the heads signed)"
    )
    print()
    print(f"recording's fixed cost with local training stubbed (stubbed_training), per round, "
          f"median of {2 if args.quick else 8} runs of {fixed_rounds} rounds: process CPU; the "
          "training thread's")
    print("own CPU; CPU inside the writer thread's _write; wall; the training thread's "
          "voluntary context switches")
    base = fixed[BASELINE]
    for name, row in fixed.items():
        print(f"  {name:<34} process {row['process cpu'] * 1e3:5.2f} ms "
              f"(+{(row['process cpu'] - base['process cpu']) * 1e3:4.2f}); training thread "
              f"{row['training thread cpu'] * 1e3:5.2f} ms "
              f"(+{(row['training thread cpu'] - base['training thread cpu']) * 1e3:4.2f}); "
              f"writer {row['writer cpu'] * 1e3:4.2f} ms; wall {row['wall'] * 1e3:5.2f} ms; "
              f"{row['switches']:4.1f} switches")
    print()
    baseline_cpu = timings.cpu.median(BASELINE) / rounds
    print("CPU time inside the recording code, per round (thread CPU clocks around the calls")
    print("in the instrumented runs, median; not counted: indirect costs such as cache or GC")
    print(f"effects), against the 'no recording' CPU time per round ({baseline_cpu * 1e3:.1f} ms):")
    for name, runs in inside.items():
        parts = {part: statistics.median(r[part] for r in runs) / rounds for part in runs[0]}
        total = sum(parts.values())
        listed = "; ".join(f"{part} {value * 1e3:.2f} ms" for part, value in parts.items())
        print(f"  {name:<16} {listed}")
        print(f"  {'':<16} total {total * 1e3:.2f} ms -> (baseline + total) / baseline "
              f"= {(baseline_cpu + total) / baseline_cpu:.3f}")
    print()
    print(f"goal recording / none <= {GOAL}, judged on the ratio of medians and on the median of")
    print("the paired ratios (each repetition runs every variant back to back):")
    for name in timings.names[1:]:
        ratio = timings.median(name) / timings.median(BASELINE)
        paired = statistics.median(timings.paired_ratios(name, BASELINE))
        verdict = "MET" if max(ratio, paired) <= GOAL else "NOT MET"
        if min(ratio, paired) <= GOAL < max(ratio, paired):
            verdict = "UNDECIDED (within noise)"
        cpu = timings.cpu.median(name) / timings.cpu.median(BASELINE)
        print(f"  {name:<34} wall {ratio:.3f} / paired {paired:.3f} -> {verdict} "
              f"(CPU-time ratio {cpu:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

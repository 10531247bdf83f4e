"""Flower's simulation engine (Ray, through ``flwr run``) vs the in-process engine, phase by
phase.

The same run (the issue-2 demo, ``_common.BENCH_CONFIG``, 20 rounds by default) through
``fedforget.engine.run_training(cfg, out=..., engine=...)`` in three variants, interleaved
(rotating order):

* ``in-process``: fedforget's in-process grid;
* ``simulation``: one ``flwr run`` against a SuperLink started and stopped for that run
  alone (what ``fedforget train --engine simulation`` does);
* ``simulation, shared``: the same inside one
  :func:`fedforget.engine.simulation.simulation_session`, whose SuperLink and Ray cluster
  (``ray start --head``, no dashboard) every run reuses, as the runs of an experiment do;
  the session's own start-up is reported apart.

Each run is cut into phases from time stamps the run leaves behind: start-up (until the
ServerApp creates the history store: for ``simulation`` the SuperLink's start, measured by a
BENCHMARK-LOCAL PATCH of ``simulation._wait_for_port``, then ``flwr run``'s submission, the
app's installation, the simulation process and Ray), identification and the first contact
with the clients (until the initial model is stored: the Ray actors start and import torch
here), the rounds (initial model to the last round's commit; per round = that / R, and the
median interval between consecutive commits), and shut-down (last commit until the call
returns). Both engines write the real history store; their final model digests are compared.

Usage: ``python benchmarks/bench_ray.py [--quick] [--rounds R] [--repetitions N]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import demo_config, describe, environment, interleave, project, scratch_dir, train

import fedforget.engine.simulation as simulation
from fedforget.history import HistoryStore

PHASES = ("start-up", "  of which SuperLink", "identification", "rounds", "shut-down")


def _parse_time(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC timestamp (``...Z``)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def phases(out: Path, start: float, end: float, superlink: float | None) -> dict[str, Any]:
    """The phases of the run in ``out`` that was called at ``start`` and returned at
    ``end`` (epoch seconds)."""
    with HistoryStore.open(out) as store:
        created = _parse_time(store.created_at)
        commits = [_parse_time(r.committed_at) for r in store.rounds()]
        summary = store.summary()
    initial = min(p.stat().st_mtime for p in (out / "blobs").glob("000000-*.pack"))
    return {
        "start-up": created - start,
        "  of which SuperLink": superlink if superlink is not None else 0.0,
        "identification": initial - created,
        "rounds": commits[-1] - initial,
        "shut-down": end - commits[-1],
        "intervals": [b - a for a, b in itertools.pairwise(commits)],
        "digest": summary["final_model_digest"],
        "rounds_done": summary["rounds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 repetition")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 20)")
    parser.add_argument("--repetitions", type=int, default=None, help="default 3")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 20)
    repetitions = args.repetitions or (1 if args.quick else 3)

    proj = project()
    cut: dict[str, list[dict[str, Any]]] = {}
    superlink_ready: list[float] = []
    wait_for_port = simulation._wait_for_port

    def timed_wait(*a: Any, **k: Any) -> None:  # BENCHMARK-LOCAL PATCH
        begin = time.time()
        wait_for_port(*a, **k)
        if k.get("what", "flower-superlink") == "flower-superlink":
            superlink_ready.append(time.time() - begin)

    simulation._wait_for_port = timed_wait  # type: ignore[assignment]
    with scratch_dir("fedforget-bench-ray-") as scratch:
        counter = itertools.count()
        session_start = time.perf_counter()
        with simulation.simulation_session() as session:
            session_seconds = time.perf_counter() - session_start
            superlink_ready.clear()

            def runner(label: str, engine: str, shared: bool) -> Any:
                def run() -> None:
                    out = scratch / f"{engine}-{next(counter)}"
                    superlink_ready.clear()
                    begin = time.time()
                    if engine == "simulation" and not shared:
                        previous, simulation._active = simulation._active, None
                        try:
                            train(demo_config(num_rounds=rounds), out, engine=engine,
                                  project=proj)
                        finally:
                            simulation._active = previous
                    else:
                        train(demo_config(num_rounds=rounds), out, engine=engine, project=proj)
                    end = time.time()
                    link = superlink_ready[0] if superlink_ready else None
                    cut.setdefault(label, []).append(phases(out, begin, end, link))

                return run

            variants = {
                "in-process": runner("in-process", "inprocess", False),
                "simulation": runner("simulation", "simulation", False),
                "simulation, shared": runner("simulation, shared", "simulation", True),
            }
            try:
                runner("warm-up", "inprocess", False)()  # imports, caches, torch
                cut.clear()
                timings = interleave(variants, repetitions=repetitions)
            except Exception:
                print("bench_ray: a run failed:", file=sys.stderr)
                traceback.print_exc()
                return 1
            ray_address = session.ray_address

    print(f"bench_ray: Flower simulation engine (Ray) vs in-process ({environment()})")
    print(
        f"config: issue-2 demo ({describe(demo_config(num_rounds=rounds))}), "
        f"{rounds} rounds; {repetitions} interleaved repetitions; run directories under "
        f"{Path(scratch).parent}; the shared session (SuperLink + Ray head at {ray_address}, "
        f"no dashboard) took {session_seconds:.2f} s to start, outside the runs' times"
    )
    print()
    print("wall time per run (ratio = median / median of in-process)")
    print(timings.table(baseline="in-process"))
    print()
    print("phases, seconds (median over repetitions; see the docstring):")
    names = list(variants)
    print(f"{'phase':<24}" + "".join(f"{n:>22}" for n in names))
    for phase in PHASES:
        values = [statistics.median(c[phase] for c in cut[n]) for n in names]
        print(f"{phase:<24}" + "".join(f"{v:>22.3f}" for v in values))
    per_round = [statistics.median(c["rounds"] for c in cut[n]) / rounds * 1e3 for n in names]
    print(f"{'per round (ms)':<24}" + "".join(f"{v:>22.1f}" for v in per_round))
    interval = [statistics.median(i for c in cut[n] for i in c["intervals"]) * 1e3
                for n in names]
    print(f"{'commit interval (ms)':<24}" + "".join(f"{v:>22.1f}" for v in interval))
    print()
    base = timings.median("in-process")
    for name in names[1:]:
        ratio = timings.median(name) / base
        print(f"{name} / in-process, {rounds} rounds: {ratio:.2f} (goal <= 2: "
              f"{'MET' if ratio <= 2 else 'NOT MET'})")
        fixed = sum(statistics.median(c[p] for c in cut[name])
                    for p in ("start-up", "identification", "shut-down"))
        in_rounds = statistics.median(c["rounds"] for c in cut[name])
        print(f"  of its {timings.median(name):.2f} s: fixed {fixed:.2f} s (start-up, "
              f"identification, shut-down), rounds {in_rounds:.2f} s")
    print()
    digests = {n: {c["digest"] for c in cut[n]} for n in names}
    for n in names:
        print(f"final model digests, {n:<20} {', '.join(sorted(digests[n]))}")
    same = len(set().union(*digests.values())) == 1
    print(f"every engine and variant agrees: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

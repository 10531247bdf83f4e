"""Flower's simulation engine (Ray, through ``flwr run``) vs the in-process engine.

The same run (the issue-2 demo, ``_common.BENCH_CONFIG``, 20 rounds by default) on both engines via
``fedforget.engine.run_training(cfg, engine=...)``; the simulation engine starts its own
``flower-superlink --simulation``, submits the run with ``flwr run`` and stops the SuperLink,
all inside the timed call. Each engine also runs a short run (2 rounds), so that the fixed
cost (start-up, identification, shut-down) and the cost per round can be told apart:

.. math:: \\text{per round} = (T_{R} - T_{2}) / (R - 2), \\qquad
          \\text{fixed} = T_{R} - R \\cdot \\text{per round}

Runs are interleaved (rotating order). Both engines write the real history store; the script
checks that their final model digests (``HistoryStore.summary()["final_model_digest"]``) agree.

The interval between consecutive round commits (``RoundRecord.committed_at``) gives the
round cadence of each engine directly, without the fixed cost.

Usage: ``python benchmarks/bench_ray.py [--quick] [--rounds R] [--repetitions N]``
(``--quick`` still takes ~40 s: starting the SuperLink and Ray alone takes ~30 s here.)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import demo_config, describe, environment, interleave, project, scratch_dir, train

from fedforget.history import HistoryStore

SHORT = 2


def _parse_time(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC timestamp (``...Z``)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 rounds, 1 repetition, no short runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 20)")
    parser.add_argument("--repetitions", type=int, default=None, help="default 3")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 20)
    repetitions = args.repetitions or (1 if args.quick else 3)
    with_short = not args.quick and rounds > SHORT

    proj = project()
    digests: dict[str, set[str]] = {}
    intervals: dict[str, list[float]] = {}
    with scratch_dir("fedforget-bench-ray-") as scratch:
        counter = itertools.count()

        def runner(engine: str, num_rounds: int) -> Any:
            label = "in-process" if engine == "inprocess" else engine

            def run() -> None:
                out = scratch / f"{engine}-{num_rounds}-{next(counter)}"
                train(demo_config(num_rounds=num_rounds), out, engine=engine, project=proj)
                with HistoryStore.open(out) as store:
                    summary = store.summary()
                    stamps = [_parse_time(r.committed_at) for r in store.rounds()]
                intervals.setdefault(label, []).extend(
                    b - a for a, b in itertools.pairwise(stamps)
                )
                if summary["rounds"] != num_rounds:
                    raise RuntimeError(f"{engine}: {summary['rounds']} rounds in {out}")
                key = f"{label}, {num_rounds} rounds"
                digests.setdefault(key, set()).add(summary["final_model_digest"])

            return run

        variants = {f"in-process, {rounds} rounds": runner("inprocess", rounds),
                    f"simulation, {rounds} rounds": runner("simulation", rounds)}
        if with_short:
            variants[f"in-process, {SHORT} rounds"] = runner("inprocess", SHORT)
            variants[f"simulation, {SHORT} rounds"] = runner("simulation", SHORT)
        try:
            runner("inprocess", 1)()  # warm-up of this process (imports, caches, torch)
            digests.clear()
            intervals.clear()
            timings = interleave(variants, repetitions=repetitions)
        except Exception:
            print("bench_ray: a run failed:", file=sys.stderr)
            traceback.print_exc()
            return 1

    inproc, sim = f"in-process, {rounds} rounds", f"simulation, {rounds} rounds"
    print(f"bench_ray: Flower simulation engine (Ray) vs in-process ({environment()})")
    print(
        f"config: issue-2 demo ({describe(demo_config(num_rounds=rounds))}), "
        f"{rounds} rounds; {repetitions} interleaved "
        f"repetitions; every run includes engine start-up and shut-down; run directories under "
        f"{Path(scratch).parent}"
    )
    print()
    print(f"wall time per run (ratio = median / median of '{inproc}')")
    print(timings.table(baseline=inproc))
    print()
    ratio = timings.median(sim) / timings.median(inproc)
    print(f"simulation / in-process, {rounds} rounds: {ratio:.2f}")
    if with_short:
        print()
        print(f"fixed cost and cost per round (from the {SHORT}- and {rounds}-round medians):")
        for engine in ("in-process", "simulation"):
            long = timings.median(f"{engine}, {rounds} rounds")
            short = timings.median(f"{engine}, {SHORT} rounds")
            per_round = (long - short) / (rounds - SHORT)
            print(
                f"  {engine:<10}  per round {per_round * 1e3:7.1f} ms   "
                f"fixed {long - rounds * per_round:6.2f} s"
            )
    print()
    print("interval between consecutive round commits (RoundRecord.committed_at), all runs:")
    for label, values in intervals.items():
        print(
            f"  {label:<10}  median {statistics.median(values) * 1e3:7.1f} ms   "
            f"min {min(values) * 1e3:7.1f} ms   max {max(values) * 1e3:7.1f} ms   "
            f"({len(values)} intervals)"
        )
    print()
    print("final model digests:")
    for key, found in digests.items():
        print(f"  {key:<22} {', '.join(sorted(found))}")
    same = digests[inproc] == digests[sim] and len(digests[inproc]) == 1
    print(f"in-process and simulation agree ({rounds} rounds): {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a short sleep of the training thread costs its CPU afterwards.

Recording and the engine make the training thread wait now and then: an fsync on the
critical path, or the GIL held by the store's writer thread while a torch op had let it go
(``bench_history.py`` counts the training thread's voluntary context switches). A wait
costs its own time, and, on some machines, CPU afterwards: caches that went cold while the
core idled (a deep C-state, or a virtual CPU the host gave to someone else).

The plain PyTorch FedAvg loop of ``bench_engine.py`` (the issue-2 demo) runs in three
variants, interleaved (rotating order) after a warm-up, with the training thread's own CPU
time inside ``train_local`` measured (thread clock):

* ``plain``: as it is;
* ``sleep``: ``time.sleep(PAUSE)`` after every ``EVERY``-th backward pass
  (BENCHMARK-LOCAL PATCH of ``torch.Tensor.backward``); a sleep uses no CPU itself, so
  any CPU it adds is the cost of having waited;
* ``spin``: the same pauses spent busy-waiting on ``time.perf_counter`` (CPU by
  construction: ``PAUSE`` per pause), for comparison.

With the defaults (2 local epochs of ~15 batches on 10 clients: ~150 backward passes a
round, a pause after every 12th) there are ~13 pauses a round, about what the store's
writer thread adds beside the training thread.

Usage: ``python benchmarks/bench_sleeps.py [--quick] [--repetitions N] [--pause S] [--every K]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import bench_engine
import torch
from _common import demo_config, environment, interleave


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 2 repetitions")
    parser.add_argument("--repetitions", type=int, default=None, help="default 9")
    parser.add_argument("--pause", type=float, default=0.0002, help="seconds (default 0.0002)")
    parser.add_argument("--every", type=int, default=12,
                        help="pause after every K-th backward pass (default 12)")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 20
    repetitions = args.repetitions or (2 if args.quick else 9)
    torch.set_num_threads(1)
    cfg = demo_config(num_rounds=rounds)

    backward = torch.Tensor.backward
    passes = [0]

    def pausing(spin: bool) -> Any:
        def patched(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            result = backward(self, *a, **k)
            passes[0] += 1
            if passes[0] % args.every == 0:
                if spin:
                    start = time.perf_counter()
                    while time.perf_counter() - start < args.pause:
                        pass
                else:
                    time.sleep(args.pause)
            return result
        return patched

    patches = {"plain": backward, "sleep": pausing(False), "spin": pausing(True)}
    inside = [0.0]
    train_local = bench_engine.train_local

    def timed(*a: Any, **k: Any) -> Any:
        cpu = time.thread_time()
        try:
            return train_local(*a, **k)
        finally:
            inside[0] += time.thread_time() - cpu

    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in patches}

    def variant(name: str) -> Any:
        def run() -> None:
            torch.Tensor.backward = patches[name]  # type: ignore[method-assign]
            inside[0], passes[0] = 0.0, 0
            bench_engine.plain_fedavg(cfg)
            samples[name].append((inside[0], passes[0]))
        return run

    variants = {name: variant(name) for name in patches}
    bench_engine.train_local = timed  # type: ignore[assignment]
    try:
        for run in variants.values():  # warm-up
            run()
        for rows in samples.values():
            rows.clear()
        interleave(variants, repetitions=repetitions)
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        bench_engine.train_local = train_local  # type: ignore[assignment]

    print(f"bench_sleeps: the training thread's CPU after short waits ({environment()})")
    pauses = statistics.median(p // args.every for _, p in samples["sleep"]) / rounds
    print(f"config: plain FedAvg loop of bench_engine, issue-2 demo, {rounds} rounds; a pause "
          f"of {args.pause * 1e6:.0f} us after every {args.every}th backward pass "
          f"({pauses:.1f} pauses a round); {repetitions} interleaved repetitions")
    print()
    print("train_local, the training thread's own CPU per round (median; min..max):")
    base = statistics.median(s for s, _ in samples["plain"]) / rounds
    for name, rows in samples.items():
        values = [s / rounds for s, _ in rows]
        median = statistics.median(values)
        own = pauses * args.pause if name == "spin" else 0.0
        extra = median - base - own
        line = (f"  {name:<6} {median * 1e3:7.2f} ms "
                f"({min(values) * 1e3:.2f}..{max(values) * 1e3:.2f})")
        if name != "plain":
            line += (f"; +{(median - base) * 1e3:.2f} ms, of which the pauses' own CPU "
                     f"{own * 1e3:.2f} ms: {extra / pauses * 1e6:.0f} us more per pause")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

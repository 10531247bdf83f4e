"""A deployed round (SuperLink + SuperNodes, warm ClientApps) vs an in-process round.

For each variant a :class:`fedforget.engine.deployment.LocalDeployment` is started on
loopback — ``flower-superlink`` with TLS and SuperNode authentication, ``--nodes``
registered SuperNodes with ``--isolation process`` and a warm ClientApp process each
(:mod:`fedforget.engine.warm_clientapp`), the SuperNode's waits shortened
(:mod:`fedforget.engine.supernode`) — and, after one warm-up run, the same run (the issue-2
demo configuration, ``_common.BENCH_CONFIG``, with ``--nodes`` clients) is trained
``--repetitions`` times on it, interleaved (rotating order) with the in-process engine.
Variants: the SuperLink's state in memory (Flower's default), or in a SQLite file
(``--database``, which keeps runs and nodes across a SuperLink restart, as
the README's Deploy section starts it); and in memory with the arrays not packed
(``FEDFORGET_PACK_LIMIT=0``: every tensor two Flower objects, as before
:mod:`fedforget.transport`), to show what packing saves.

A round's time is the interval between two consecutive round commits
(``RoundRecord.committed_at``) of the same run: it leaves out what a run pays once (FAB
build and submission, the ServerApp's start, identification, the final evaluation). The
ratio compared with the goal of issue 10 (≤ 3×) is

.. math:: \\frac{\\operatorname{median}(\\text{deployed round intervals})}
               {\\operatorname{median}(\\text{in-process round intervals})}

measured side by side in the same run of this script. Wall time per run (with its fixed
cost) and the phases of each deployment's start and stop are printed too. Both engines
must end with the same final model digest (checked; exit status 1 otherwise).

The SuperLink is one Python process that serves every request of the federation (Flower
1.42's HTTP API: FastAPI, eight middlewares, a thread hand-off per request), so its CPU
time per round is close to a lower bound of a round's wall time. The script samples the
SuperLink's CPU time every 50 ms during each deployed run and prints its CPU per round
between the first and the last round commit, and that over the in-process round: the ratio
the round could not go below without fewer or cheaper SuperLink requests. Before the first
run it also measures the SuperLink's CPU per second while the federation is idle (nothing
but the nodes' idle polls, each node asking about every ``--max-poll-interval`` s).

``--cold`` adds one 3-round run with Flower's defaults (``--isolation subprocess``: a new
``flwr-clientapp`` per message; stock ``flower-supernode``, which sleeps 3 s after each
empty poll), the setting issue 10 measured at ~30 s per round.

Usage: ``python benchmarks/bench_deployment.py [--quick] [--rounds R] [--repetitions N]
[--nodes N] [--variants A,B] [--max-poll-interval S] [--cold]``
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import BENCH_CONFIG, describe, environment, interleave, project, scratch_dir

from fedforget.engine import declared_run_config, run_training
from fedforget.engine.deployment import LocalDeployment
from fedforget.history import HistoryStore
from fedforget.settings import RunSettings

GOAL = 3.0


def bench_config(*, num_rounds: int, num_clients: int) -> Any:
    """The issue-2 demo configuration (``_common.BENCH_CONFIG``) with these rounds and
    clients."""
    from fedforget.config import RunConfig

    return RunConfig.from_mapping({**BENCH_CONFIG, "num-rounds": num_rounds,
                                   "num-clients": num_clients})


def _parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _commits(out: Path, rounds: int) -> tuple[list[float], str]:
    """Round-commit times and the final digest of the run in ``out``."""
    with HistoryStore.open(out) as store:
        summary = store.summary()
        stamps = [_parse_time(r.committed_at) for r in store.rounds()]
    if summary["rounds"] != rounds:
        raise RuntimeError(f"{out}: {summary['rounds']} rounds, expected {rounds}")
    return stamps, summary["final_model_digest"]


def _intervals(out: Path, rounds: int) -> tuple[list[float], str]:
    """Round-commit intervals and the final digest of the run in ``out``."""
    stamps, digest = _commits(out, rounds)
    return [b - a for a, b in itertools.pairwise(stamps)], digest


def _cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system, with those of its reaped children: the ServerApp of a run
    is a child of the SuperLink's SuperExec) of each process in ``pids`` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = sum(int(v) for v in fields[11:15]) / ticks
    return out


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (``flwr run``, ``flwr log``, ...)."""
    t = os.times()
    return t.children_user + t.children_system


def _phase(label: str, seconds: float) -> None:
    print(f"  phase: {label:<46} {seconds:7.2f} s", file=sys.stderr, flush=True)


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (label, LocalDeployment settings)
    "memory": ("warm ClientApps, SuperLink state in memory",
               {"warm": True, "poll_interval": 0.02, "database": False}),
    "database": ("warm ClientApps, SuperLink state in --database (as the README's Deploy section)",
                 {"warm": True, "poll_interval": 0.02, "database": True}),
    "unpacked": ("as memory, arrays not packed (FEDFORGET_PACK_LIMIT=0: Flower's objects)",
                 {"warm": True, "poll_interval": 0.02, "database": False}),
}
ENV = {"unpacked": {"FEDFORGET_PACK_LIMIT": "0"}}
"""Environment of a variant's federation (its processes inherit it)."""
IDLE_SETTLE, IDLE_WINDOW = 3.0, 10.0
"""Seconds after the nodes connect before, and of, the idle SuperLink measurement."""
COLD = {"warm": False, "poll_interval": None, "database": True}  # Flower's defaults


@dataclass
class _Result:
    """What one variant measured."""

    label: str
    phases: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    digests: dict[str, set[str]] = field(default_factory=dict)
    overhead: list[float] = field(default_factory=list)
    timings: Any = None
    cpu: dict[str, list[float]] = field(default_factory=lambda: {
        "federation": [], "flwr CLI": [], "in-process": []})
    superlink_per_round: list[float] = field(default_factory=list)
    """SuperLink CPU seconds per round (between a run's first and last round commit)."""
    superlink_idle: float | None = None
    """SuperLink CPU seconds per second of an idle federation."""


class _CpuSampler:
    """CPU time of one process, sampled every ``period`` s on a thread (Linux /proc)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _cpu_of([self.pid]).get(self.pid, 0.0)))
            self._stop.wait(self.period)

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, stamp: float) -> float:
        """CPU time at ``stamp`` (the sample nearest before it)."""
        times = [t for t, _ in self.samples]
        return self.samples[max(bisect.bisect_right(times, stamp) - 1, 0)][1]


def _measure(label: str, settings: dict[str, Any], scratch: Path, proj: Any, *, nodes: int,
             rounds: int, repetitions: int) -> _Result:
    """Start a federation with ``settings``; a warm-up run; then ``repetitions`` deployed
    runs interleaved with in-process runs of the same configuration (``repetitions = 0``:
    one deployed run only)."""
    result = _Result(label, intervals={"deployed": [], "in-process": []},
                     digests={"deployed": set(), "in-process": set()})
    counter = itertools.count()
    federation = LocalDeployment(scratch / f"federation-{next(counter)}", num_nodes=nodes,
                                 **settings)
    cfg = bench_config(num_rounds=rounds, num_clients=nodes)

    def deployed() -> None:
        out = scratch / f"deployed-{next(counter)}"
        run = RunSettings(out_dir=str(out), progress=False, engine="deployment",
                          node_auth=True)
        before, cli_before = _cpu_of(federation.process_ids()), _children_cpu()
        assert federation.superlink_pid is not None
        with _CpuSampler(federation.superlink_pid) as sampler:
            done = federation.run(declared_run_config(proj, {**cfg.to_mapping(),
                                                             **run.to_run_config()}),
                                  project=proj, timeout=3600)
        after = _cpu_of(federation.process_ids())
        result.cpu["federation"].append(sum(after.get(p, 0.0) - before.get(p, 0.0)
                                            for p in after))
        result.cpu["flwr CLI"].append(_children_cpu() - cli_before)
        stamps, digest = _commits(out, rounds)
        found = [b - a for a, b in itertools.pairwise(stamps)]
        if len(stamps) > 1:
            result.superlink_per_round.append(
                (sampler.at(stamps[-1]) - sampler.at(stamps[0])) / (len(stamps) - 1))
        result.intervals["deployed"] += found
        result.digests["deployed"].add(digest)
        result.overhead.append(done.seconds - sum(found))

    def inprocess() -> None:
        out = scratch / f"inprocess-{next(counter)}"
        started = time.process_time()
        run_training(cfg, out=out, engine="inprocess", project=proj, progress=False)
        result.cpu["in-process"].append(time.process_time() - started)
        found, digest = _intervals(out, rounds)
        result.intervals["in-process"] += found
        result.digests["in-process"].add(digest)

    def keep_phases() -> None:
        for name, seconds in federation.phases.items():
            if name not in result.phases:
                result.phases[name] = seconds
                _phase(f"{label}: {name}", seconds)

    try:
        federation.start()
        keep_phases()
        if repetitions:  # the SuperLink's CPU while only the nodes' idle polls reach it
            time.sleep(IDLE_SETTLE)
            assert federation.superlink_pid is not None
            pid = federation.superlink_pid
            cpu0, t0 = _cpu_of([pid])[pid], time.perf_counter()
            time.sleep(IDLE_WINDOW)
            result.superlink_idle = (_cpu_of([pid])[pid] - cpu0) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        deployed()  # warm-up: the FAB installed on every node, data loaded, imports done
        result.phases["first run (FAB installs, data, imports)"] = time.perf_counter() - t0
        _phase(f"{label}: first run", result.phases["first run (FAB installs, data, imports)"])
        if repetitions:
            inprocess()  # warm-up of this process
            for found in result.intervals.values():
                found.clear()
            for digests in result.digests.values():
                digests.clear()
            result.overhead.clear()
            result.superlink_per_round.clear()
            for values in result.cpu.values():
                values.clear()
            result.timings = interleave({"deployed": deployed, "in-process": inprocess},
                                        repetitions=repetitions)
    finally:
        federation.stop()
        keep_phases()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, 1 repetition")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 20)")
    parser.add_argument("--repetitions", type=int, default=None, help="default 3")
    parser.add_argument("--nodes", type=int, default=4, help="SuperNodes = clients (4)")
    parser.add_argument("--variants", default="memory,unpacked,database",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--max-poll-interval", type=float, default=0.25,
                        help="longest idle poll of the SuperNodes and warm ClientApps "
                             "(default 0.25 s)")
    parser.add_argument("--cold", action="store_true",
                        help="also one 3-round run with Flower's defaults (a process per "
                             "message, stock flower-supernode)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 20)
    repetitions = args.repetitions or (1 if args.quick else 3)
    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; expected one of {', '.join(VARIANTS)}")
    proj = project()
    results: list[_Result] = []
    with scratch_dir("fedforget-bench-deploy-") as scratch:
        try:
            for name in labels:
                label, settings = VARIANTS[name]
                settings = {**settings, "max_poll_interval": args.max_poll_interval}
                saved = {k: os.environ.get(k) for k in ENV.get(name, {})}
                os.environ.update(ENV.get(name, {}))
                try:
                    results.append(_measure(label, settings, scratch / name, proj,
                                            nodes=args.nodes, rounds=rounds,
                                            repetitions=repetitions))
                finally:
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
            if args.cold:
                results.append(_measure("cold (Flower defaults)", COLD, scratch / "cold", proj,
                                        nodes=args.nodes, rounds=3, repetitions=0))
        except Exception:
            print("bench_deployment: a run failed:", file=sys.stderr)
            traceback.print_exc()
            return 1

    cfg = bench_config(num_rounds=rounds, num_clients=args.nodes)
    print(f"bench_deployment: deployed (SuperLink + {args.nodes} SuperNodes on loopback, TLS, "
          f"SuperNode authentication) vs in-process ({environment()})")
    print(f"config: issue-2 demo with {args.nodes} clients ({describe(cfg)}), {rounds} rounds; "
          f"per variant {repetitions} interleaved repetitions after one warm-up run each; "
          f"idle polls grow to {args.max_poll_interval:g} s; arrays packed "
          f"(fedforget.transport)")
    agree = True
    for result in results:
        print()
        print(f"=== {result.label} ===")
        print("phases:")
        for name, seconds in result.phases.items():
            print(f"  {name:<52} {seconds:7.2f} s")
        deployed, inproc = result.intervals["deployed"], result.intervals["in-process"]
        if result.timings is None:  # the cold run: its round intervals only
            print("interval between round commits: "
                  + ", ".join(f"{v:.2f} s" for v in deployed))
            continue
        print("wall time per run (deployed: `flwr run` to its final status, federation up)")
        print(result.timings.table(baseline="in-process"))
        print(f"fixed cost of a deployed run (wall time minus its round intervals): median "
              f"{statistics.median(result.overhead):.2f} s")
        print("interval between consecutive round commits (RoundRecord.committed_at):")
        for name, values in (("deployed", deployed), ("in-process", inproc)):
            print(f"  {name:<10}  median {statistics.median(values) * 1e3:8.1f} ms   "
                  f"min {min(values) * 1e3:8.1f} ms   max {max(values) * 1e3:8.1f} ms   "
                  f"({len(values)} intervals)")
        cpu = {k: statistics.median(v) for k, v in result.cpu.items() if v}
        if len(cpu) == 3:
            total = cpu["federation"] + cpu["flwr CLI"]
            print(f"CPU per run (median; a run's fixed costs included): deployed {total:.2f} s "
                  f"(SuperLink, SuperNodes, ClientApps, ServerApp {cpu['federation']:.2f} s; "
                  f"flwr CLI {cpu['flwr CLI']:.2f} s), in-process {cpu['in-process']:.2f} s: "
                  f"{total / cpu['in-process']:.2f}x the CPU")
        if result.superlink_idle is not None:
            polls = args.nodes / args.max_poll_interval
            print(f"SuperLink CPU, federation idle ({IDLE_WINDOW:g} s, only idle polls; "
                  f"{args.nodes} nodes at <= {args.max_poll_interval:g} s are about "
                  f"{polls:.0f} polls/s): {result.superlink_idle * 1e3:.0f} ms per s, about "
                  f"{result.superlink_idle / polls * 1e3:.1f} ms per idle poll")
        if result.superlink_per_round:
            per_round = statistics.median(result.superlink_per_round)
            print(f"SuperLink CPU per round (median of {len(result.superlink_per_round)} runs, "
                  f"first to last round commit): {per_round * 1e3:.1f} ms = "
                  f"{per_round / statistics.median(inproc):.2f}x the in-process round "
                  f"(one process: about the lowest ratio its requests allow)")
        ratio = statistics.median(deployed) / statistics.median(inproc)
        print(f"deployed round / in-process round (median intervals): {ratio:.2f}  "
              f"(goal <= {GOAL:g}: {'met' if ratio <= GOAL else 'NOT met'})")
        same = (result.digests["deployed"] == result.digests["in-process"]
                and len(result.digests["deployed"]) == 1)
        agree = agree and same
        print(f"final model digests agree: {'yes' if same else 'NO'} "
              f"({', '.join(sorted(result.digests['deployed'] | result.digests['in-process']))})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

"""Train and unlearn at scale on the in-process engine: 1,000 clients x 100 rounds, then
10,000 clients x 20 rounds for the growth.

Every step is one ``fedforget`` command in a fresh process (``benchmarks/_measured.py``), as
a user runs it, so that each reports its own wall time (interpreter start-up and imports
included), CPU time (all threads), peak RSS, and the bytes of history blobs it read:

1. ``fedforget train`` of the scale configuration (synthetic data, 40 examples per client,
   IID, an MLP of 1,604 parameters, 10 % of the clients per round, history with fsync);
2. ``fedforget unlearn --method subtract --reference none`` (goal: < 5 s);
3. ``fedforget unlearn --method retrain`` (computes and caches the retrained reference,
   and fits and keeps both membership attacks: the shadow attack's once per run,
   FedEraser's attack on the original model once per request);
4. ``fedforget unlearn --method subtract --reference cached`` (goal: < 10 s): a second
   method of the same request, which loads the reference and both fitted attacks;
5. ``rollback``, ``federaser`` (Δt = 2, r = 0.5) and every further server-side method
   given (``--methods``; default ``fedrecovery`` and, when registered, the methods issue's
   fast ones), each with ``--reference cached``;
6. the same training with 10 x the clients for 1/5 of the rounds, the same clients per
   round (``sample-count``), and ``subtract --reference none`` on it (goal: peak RSS within
   1.5 x the 1,000-client run's).

The project's packages are byte-compiled first (as an installed package is; on a machine
with ``PYTHONDONTWRITEBYTECODE`` set every fresh command would compile them again).

Unlearning measures the result as ``fedforget unlearn`` does by default (per-client impact on
a seeded sample of 100 remaining clients, shadow attack on). Before each method the run's
in-service pointer is cleared, so that every method starts from the trained model. A
memory-copy bandwidth (``numpy.copyto`` of 8 MB) is measured in this process and each
method's history bytes are shown against it (the time a copy of those bytes would take).

Usage: ``python benchmarks/bench_scale.py [--quick] [--clients N] [--rounds R]
[--growth-clients N] [--growth-rounds R] [--methods M ...] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, environment, scratch_dir

MEASURED = Path(__file__).resolve().parent / "_measured.py"
FAST_METHOD_CANDIDATES = ("fast-fedul", "fastfedul", "fukd")


def scale_config(clients: int, rounds: int, per_round: int) -> dict[str, Any]:
    """The scale run: 40 synthetic examples per client (50 before the test split); a
    quarter of the global test split is the server's proxy set (FUKD distils on it)."""
    return {
        "seed": 0, "num-rounds": rounds, "num-clients": clients, "dataset": "synthetic",
        "synthetic-samples": 50 * clients, "synthetic-features": 20, "synthetic-classes": 4,
        "partitioner": "iid", "holdout-fraction": 0.2, "model": "mlp", "hidden-size": 64,
        "local-epochs": 1, "batch-size": 32, "learning-rate": 0.1, "sample-count": per_round,
        "retain-interval": 1, "codec": "fp32", "proxy-fraction": 0.25,
    }


def compile_bytecode() -> str:
    """Byte-compile the project's packages (``__pycache__``, ignored by git) before the
    timed commands, as an installed package is: where ``PYTHONDONTWRITEBYTECODE`` is set (as
    on the development machine), every fresh process would otherwise compile the ~110
    modules of fedforget and its apps from source again (about 0.3 s each command).
    Returns a line for the output."""
    import compileall

    packages = ["fedforget", "clients", "server", "strategies"]
    ok = all(compileall.compile_dir(str(ROOT / name), quiet=1) for name in packages)
    setting = os.environ.get("PYTHONDONTWRITEBYTECODE")
    return (f"bytecode of {', '.join(packages)} compiled before the runs "
            f"({'ok' if ok else 'some modules failed'}; PYTHONDONTWRITEBYTECODE="
            f"{setting!r})")


def write_toml(values: dict[str, Any], path: Path) -> Path:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, int | float) else json.dumps(v)

    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in values.items()))
    return path


def measured(args: list[str], workdir: Path, label: str) -> dict[str, Any]:
    """Run ``fedforget ARGS`` in a fresh process; return its report (+ outer wall time)."""
    report = workdir / f"report-{label}.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(MEASURED), str(report), *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    outer = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fedforget {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(report.read_text())
    data["outer_wall_seconds"] = outer
    data["stdout"] = done.stdout
    print(f"  {label}: {outer:.1f} s", file=sys.stderr, flush=True)
    return data


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def copy_bandwidth(nbytes: int = 8 << 20, repetitions: int = 21) -> float:
    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def contributor(run: Path) -> str:
    """The first client (by id) that took part in the run."""
    from fedforget.history import HistoryStore

    with HistoryStore.open(run) as store:
        for cid in store.roster():
            if store.client_rounds(cid):
                return cid
    raise RuntimeError(f"nobody took part in {run}")


def unlearn(run: Path, client: str, method: str, workdir: Path, *extra: str,
            label: str) -> dict[str, Any]:
    from fedforget.rundir import RunDirectory

    RunDirectory(run).current.unlink(missing_ok=True)  # every method from the trained model
    report = measured(["unlearn", str(run), "--client", client, "--method", method, "--json",
                       *extra], workdir, label)
    report["result"] = json.loads(report.pop("stdout"))
    return report


def row(label: str, r: dict[str, Any], bandwidth: float) -> str:
    read = r.get("history_bytes_read", 0)
    at_bandwidth = read / bandwidth * 1e3
    method = r.get("result", {}).get("cost", {}).get("server_seconds")
    inner = f"{method:8.2f}" if isinstance(method, float) else f"{'':>8}"
    return (f"{label:<38} {r['outer_wall_seconds']:8.2f} {r['cpu_seconds']:8.2f} {inner} "
            f"{r['peak_rss_bytes'] / 2**20:8.0f} {read:>14,} {at_bandwidth:10.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 clients x 10 rounds, growth 2,000 x 2")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--growth-clients", type=int, default=None)
    parser.add_argument("--growth-rounds", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="further server-side methods to time (default: fedrecovery and "
                             "any registered fast method of the methods issue)")
    parser.add_argument("--keep", default=None, help="keep the runs in this directory")
    args = parser.parse_args(argv)
    clients = args.clients or (200 if args.quick else 1000)
    rounds = args.rounds or (10 if args.quick else 100)
    growth_clients = args.growth_clients or 10 * clients
    growth_rounds = args.growth_rounds or max(2, rounds // 5)
    per_round = max(1, clients // 10)

    from fedforget.unlearning import METHODS

    extra_methods = args.methods if args.methods is not None else (
        ["fedrecovery"] + [m for m in FAST_METHOD_CANDIDATES if m in METHODS])
    bytecode = compile_bytecode()
    bandwidth = copy_bandwidth()
    reports: dict[str, dict[str, Any]] = {}
    with scratch_dir("fedforget-bench-scale-") as scratch:
        base = Path(args.keep) if args.keep else scratch
        base.mkdir(parents=True, exist_ok=True)
        run = base / f"scale-{clients}"
        config = write_toml(scale_config(clients, rounds, per_round), base / "scale.toml")
        reports["train"] = measured(["train", str(config), "--out", str(run), "--quiet"],
                                    base, "train")
        disk = directory_bytes(run)
        client = contributor(run)
        reports["subtract --reference none"] = unlearn(
            run, client, "subtract", base, "--reference", "none", label="subtract-none")
        reports["retrain (computes the reference)"] = unlearn(
            run, client, "retrain", base, "--quiet", label="retrain")
        reports["subtract --reference cached"] = unlearn(
            run, client, "subtract", base, "--reference", "cached", label="subtract-cached")
        for method, params in (("rollback", []),
                               ("federaser", ["--set", "retain-interval=2",
                                              "--set", "calibration-ratio=0.5"]),
                               *((m, []) for m in extra_methods)):
            reports[f"{method} --reference cached"] = unlearn(
                run, client, method, base, "--reference", "cached", "--quiet", *params,
                label=method)

        growth = base / f"scale-{growth_clients}"
        growth_config = write_toml(scale_config(growth_clients, growth_rounds, per_round),
                                   base / "growth.toml")
        reports["growth: train"] = measured(
            ["train", str(growth_config), "--out", str(growth), "--quiet"], base,
            "growth-train")
        growth_disk = directory_bytes(growth)
        growth_client = contributor(growth)
        reports["growth: subtract --reference none"] = unlearn(
            growth, growth_client, "subtract", base, "--reference", "none",
            label="growth-subtract-none")

    print(f"bench_scale: training and unlearning at scale, in-process engine ({environment()})")
    print(f"run: {clients} clients x {rounds} rounds, {per_round} clients per round "
          f"(synthetic, 40 examples per client, IID, MLP of 1,604 parameters, 1 local epoch, "
          f"fp32, history fsync on); forgotten: {client}; growth: {growth_clients} clients x "
          f"{growth_rounds} rounds, {per_round} per round; forgotten: {growth_client}")
    print(f"history on disk: {disk:,} B ({disk / rounds:,.0f} B per round) for the "
          f"{clients}-client run, {growth_disk:,} B for the {growth_clients}-client run")
    print(bytecode)
    print(f"memory-copy bandwidth (numpy.copyto, 8 MB, median of 21): "
          f"{bandwidth / 1e9:.2f} GB/s")
    print("each step is a fresh `fedforget` process: wall time includes Python start-up and "
          "imports; 'method' is the unlearning method's own server time; 'copy ms' is the "
          "time a memory copy of the history bytes read would take")
    print()
    head = (f"{'step':<38} {'wall s':>8} {'CPU s':>8} {'method s':>8} {'RSS MiB':>8} "
            f"{'history read B':>14} {'copy ms':>10}")
    print(head)
    print("-" * len(head))
    for label, report in reports.items():
        print(row(label, report, bandwidth))
    print()
    imports = statistics.median(r["imports_seconds"] for r in reports.values())
    print(f"median time to import fedforget's CLI in these processes: {imports:.2f} s")
    for label in ("subtract --reference none", "subtract --reference cached"):
        r = reports[label]["result"]
        print(f"{label}: reference {r['reference']['status']}, per-client impact "
              f"{r['metrics'].get('client_impact_sample')}, notes: {r['notes']}")
    print()
    train_rss = reports["train"]["peak_rss_bytes"]
    growth_rss = reports["growth: train"]["peak_rss_bytes"]
    goals = [
        ("subtract --reference none < 5 s",
         reports["subtract --reference none"]["outer_wall_seconds"], 5.0),
        ("subtract --reference cached < 10 s",
         reports["subtract --reference cached"]["outer_wall_seconds"], 10.0),
        (f"peak RSS of training, {growth_clients} / {clients} clients <= 1.5",
         growth_rss / train_rss, 1.5),
        (f"peak RSS of subtract, {growth_clients} / {clients} clients <= 1.5",
         reports["growth: subtract --reference none"]["peak_rss_bytes"]
         / reports["subtract --reference none"]["peak_rss_bytes"], 1.5),
    ]
    for text, value, bound in goals:
        print(f"goal {text}: {value:.2f} -> {'MET' if value <= bound else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

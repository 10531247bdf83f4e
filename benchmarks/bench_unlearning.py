"""Every unlearning method against retraining, on digits with a backdoor client.

The protocol of issue 3: scikit-learn digits, 10 clients, Dirichlet(0.5) label split, an
MLP trained with FedAvg; client-003 plants a backdoor (half of its examples stamped with a
2×2 trigger and relabelled 0), then withdraws. For each seed the run is trained once and
every method unlearns client-003 from it; the retrained model is the reference.

Printed per method (mean ± std over seeds): test accuracy, accuracy on the forgotten
client's data, backdoor success, L2 distance to the retrained model, client-epochs and
the speed-ups against retraining, and whether each acceptance goal holds:

* rollback and federaser: backdoor success within 5 points of retrain's, test accuracy
  within 2 points of retrain's;
* federaser (r = 0.5, Δt = 2): at most 30% of retrain's client-epochs.

Usage::

    python benchmarks/bench_unlearning.py [--seeds 0 1 2] [--rounds 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedforget.config import load_config, parse_assignments  # noqa: E402
from fedforget.engine import run_training, run_unlearning  # noqa: E402
from fedforget.engine.apps import find_project  # noqa: E402
from fedforget.rundir import RunDirectory  # noqa: E402

CLIENT = "client-003"
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("retrain", {}),
    ("rollback", {}),
    ("federaser", {"retain-interval": 2, "calibration-ratio": 0.5}),
    ("subtract", {}),
    ("fedrecovery", {}),
    ("fedrecover", {}),
    ("pga", {}),
]


def run_seed(seed: int, rounds: int, workdir: Path, overrides: dict[str, Any]
             ) -> dict[str, dict[str, Any]]:
    """Train one run and unlearn the backdoor client with every method."""
    project = find_project(ROOT)
    out = workdir / f"seed-{seed}"
    cfg = load_config(
        ROOT / "simulations" / "demo.toml",
        **{**overrides, "seed": seed, "num-rounds": rounds},
    )
    t0 = time.perf_counter()
    run_training(cfg, out=out, engine="inprocess", project=project, progress=False)
    print(f"seed {seed}: trained {rounds} rounds in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    for name, params in METHODS:
        t1 = time.perf_counter()
        # every method starts from the trained model (as in `fedforget run`)
        RunDirectory(out).current.unlink(missing_ok=True)
        try:
            outcome = run_unlearning(out, client=CLIENT, method=name, params=params,
                                     reason="benchmark", project=project, progress=False)
        except Exception as exc:  # a method that fails is reported, not hidden
            print(f"seed {seed}: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        if outcome is None:
            raise RuntimeError(f"{CLIENT} never contributed to {out}")
        print(f"seed {seed}: {name} done in {time.perf_counter() - t1:.1f} s", file=sys.stderr)
        results[name] = outcome.to_dict()
    return results


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]]) -> str:
    """The markdown table and the acceptance checks."""
    lines = [
        "| method | test acc % | forgotten acc % | backdoor % | L2 to retrain | "
        "client-epochs | speed-up (client-epochs) | speed-up (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def column(method: str, fn: Any) -> list[float]:
        out = []
        for results in per_seed.values():
            info = results.get(method, {})
            if "metrics" in info:
                value = fn(info)
                if value is not None:
                    out.append(float(value))
        return out

    first = next(iter(per_seed.values()))
    original = first["retrain"]["metrics"] if "metrics" in first.get("retrain", {}) else None
    if original is not None:
        lines.append(
            "| original (before unlearning) | "
            f"{_mean_std(column('retrain', lambda i: 100 * i['metrics']['test_accuracy']['original']))} | "  # noqa: E501
            f"{_mean_std(column('retrain', lambda i: 100 * i['metrics']['forgotten_accuracy']['original']))} | "  # noqa: E501
            f"{_mean_std(column('retrain', lambda i: 100 * i['metrics']['backdoor_success']['original']))} | "  # noqa: E501
            f"{_mean_std(column('retrain', lambda i: i['metrics']['l2_to_retrained']['original']))} "  # noqa: E501
            "| | | |"
        )
    for method, _ in METHODS:
        errors = [r[method]["error"] for r in per_seed.values() if "error" in r.get(method, {})]
        if errors:
            lines.append(f"| {method} | failed: {errors[0]} | | | | | | |")
            continue
        lines.append(
            f"| {method} | "
            f"{_mean_std(column(method, lambda i: 100 * i['metrics']['test_accuracy']['unlearned']))} | "  # noqa: E501
            f"{_mean_std(column(method, lambda i: 100 * i['metrics']['forgotten_accuracy']['unlearned']))} | "  # noqa: E501
            f"{_mean_std(column(method, lambda i: 100 * i['metrics']['backdoor_success']['unlearned']))} | "  # noqa: E501
            f"{_mean_std(column(method, lambda i: i['metrics']['l2_to_retrained']['unlearned']))} | "  # noqa: E501
            f"{_mean_std(column(method, lambda i: i['cost']['client_epochs']))} | "
            f"{_mean_std(column(method, lambda i: i['metrics']['speedup_client_epochs']))} | "
            f"{_mean_std(column(method, lambda i: i['metrics']['speedup_wall']))} |"
        )
    lines.append("")
    lines.append("Acceptance checks (per seed, against that seed's retrain):")
    for method in ("rollback", "federaser"):
        for seed, results in per_seed.items():
            info = results.get(method, {})
            if "metrics" not in info:
                lines.append(f"- {method}, seed {seed}: FAILED to run")
                continue
            m = info["metrics"]
            bd, acc = m["backdoor_success"], m["test_accuracy"]
            d_bd = 100 * abs(bd["unlearned"] - bd["retrained"])
            d_acc = 100 * abs(acc["unlearned"] - acc["retrained"])
            ok = d_bd <= 5 and d_acc <= 2
            line = (f"- {method}, seed {seed}: backdoor gap {d_bd:.2f} points (<= 5), "
                    f"test-accuracy gap {d_acc:.2f} points (<= 2): {'met' if ok else 'MISSED'}")
            if method == "federaser":
                share = info["cost"]["client_epochs"] / info["reference"]["cost"]["client_epochs"]
                line += (f"; client-epochs {100 * share:.1f}% of retrain's (<= 30%): "
                         f"{'met' if share <= 0.30 else 'MISSED'}")
            lines.append(line)
    return "\n".join(lines)


def main() -> int:
    """Run the protocol and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key of simulations/demo.toml")
    args = parser.parse_args()
    overrides = parse_assignments(args.set)
    with tempfile.TemporaryDirectory(prefix="fedforget-bench-") as tmp:
        workdir = Path(args.out) if args.out else Path(tmp)
        per_seed = {seed: run_seed(seed, args.rounds, workdir, overrides) for seed in args.seeds}
    if args.json:
        Path(args.json).write_text(json.dumps(per_seed, indent=2, sort_keys=True, default=str))
    cfg = load_config(ROOT / "simulations" / "demo.toml", **overrides)
    print(f"{cfg.dataset}, {cfg.num_clients} clients, {cfg.partitioner}"
          f"({cfg.dirichlet_alpha}), {cfg.model}, {args.rounds} rounds, {cfg.local_epochs} local "
          f"epochs, lr {cfg.learning_rate}, batch {cfg.batch_size}; backdoor client {CLIENT} "
          f"withdraws; seeds {args.seeds}")
    print()
    print(summarise(per_seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

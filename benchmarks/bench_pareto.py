"""Pareto benchmark: every whole-client unlearning method on three protocols, fidelity against cost.

Issue 12, item 6. Every method registered in :data:`fedforget.unlearning.METHODS` that serves
whole-client requests runs with its default parameters on three protocols, each built from
a shipped experiment file and run by the experiment runner (``fedforget run``'s), so the
results are resumable cell files (``<out>/<protocol>/cells/``, ``results.csv``, a full
``report.md``):

* ``quickstart`` — ``simulations/quickstart.toml``'s run (digits, 10 clients, Dirichlet(0.5),
  client-003 plants a backdoor, 30 rounds);
* ``backdoor`` — ``simulations/methods_backdoor.toml``'s run (client-003 and client-007
  plant a backdoor, 40 rounds, a quarter of the test split held by the server as FUKD's
  proxy set);
* ``noniid`` — ``simulations/noniid_sweep.toml``'s run at its smallest Dirichlet α (0.1: very
  skewed labels), client-003 withdraws after 40 rounds.

Methods that serve only record or class requests (``fucp``) are skipped, and methods that
distil on the server's proxy set (``fukd``) run only where the protocol has one; the output
says which. Printed per protocol and method, mean ± sample std over the seeds: test-accuracy
gap to the retrained reference of the same seed (points), backdoor success, accuracy on the
forgotten clients' data, the loss attack's MIA AUC with its 95% stratified-bootstrap
interval (the per-seed bounds averaged) and in how many seeds it is within noise of the
retrained model's, and the method's client-epochs and server wall time as ratios of
retraining's (``retrain_cost_*``, the reference of the same cell). ``*`` marks the Pareto
front of |accuracy gap| against the client-epoch ratio (no other method is at least as
close to retraining for at most the cost, one of the two strictly). Written to ``--out``:
``pareto.md`` (the tables and the command) and ``pareto.png`` (accuracy gap against the
client-epoch ratio, log x, one panel per protocol).

Usage::

    .venv/bin/python benchmarks/bench_pareto.py [--out DIR] [--seeds 0 1 2] [--workers N]
        [--protocols quickstart backdoor noniid] [--methods NAME ...] [--quick]

``--quick`` is a smoke run (about a minute): seed 0, 5 rounds, retrain, federaser and
subtract. Re-running a command resumes it: finished cells are read back, not re-run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedforget.errors import ConfigError  # noqa: E402

QUICK_METHODS = ("retrain", "federaser", "subtract")
QUICK_ROUNDS = 5
# Methods that distil on the server's proxy set: they need run-config proxy-fraction > 0.
PROXY_METHODS = frozenset({"fukd"})
REFERENCE = "retrain"  # listed first; the gap and ratios are to the cell's retrained reference


@dataclass(frozen=True)
class Protocol:
    """One protocol: a shipped experiment file's run, with the benchmark's changes."""

    name: str
    source: str  # under simulations/
    title: str
    run: Mapping[str, Any]  # [run] keys set here (the file's grid is dropped)


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("quickstart", "quickstart.toml",
             "quick-start: digits, 10 clients, Dirichlet(0.5), client-003 backdoored", {}),
    Protocol("backdoor", "methods_backdoor.toml",
             "backdoor: client-003 and client-007 backdoored, proxy set 25%", {}),
    Protocol("noniid", "noniid_sweep.toml",
             "non-IID: Dirichlet(0.1), client-003 withdraws",
             {"dirichlet-alpha": 0.1}),
)


# ---------------------------------------------------------------- building the experiments
def whole_client_methods() -> tuple[list[str], dict[str, str]]:
    """The registered methods that serve whole-client requests (``retrain`` first), and the
    others with the reason they are skipped."""
    from fedforget.unlearning import METHODS

    chosen, skipped = [], {}
    for name in METHODS:
        kinds = METHODS.get(name).request_kinds
        if "client" in kinds:
            chosen.append(name)
        else:
            skipped[name] = f"serves only {' / '.join(kinds)} requests"
    chosen.sort(key=lambda n: n != REFERENCE)
    return chosen, skipped


def protocol_methods(protocol_run: Mapping[str, Any], methods: Sequence[str]
                     ) -> tuple[list[str], dict[str, str]]:
    """``methods`` that the protocol's run can serve, and the others with the reason."""
    has_proxy = float(protocol_run.get("proxy-fraction", 0.0)) > 0
    kept = [m for m in methods if has_proxy or m not in PROXY_METHODS]
    reasons = {m: "distils on a proxy set; this run has none (proxy-fraction = 0)"
               for m in methods if m not in kept}
    return kept, reasons


def build_spec(protocol: Protocol, methods: Sequence[str], *, seeds: Sequence[int],
               rounds: int | None = None) -> Any:
    """The protocol's experiment: its file's [experiment] and [run] (with the protocol's
    changes), no grid, ``methods`` with their defaults, ``seeds``."""
    from fedforget.config import read_toml
    from fedforget.experiments import parse_experiment

    path = ROOT / "simulations" / protocol.source
    doc = read_toml(path, what="experiment file")
    experiment = dict(doc["experiment"])
    experiment["name"] = f"pareto-{protocol.name}"
    experiment["seeds"] = list(seeds)
    experiment["description"] = (f"Pareto benchmark, {protocol.title} (from "
                                 f"simulations/{protocol.source}).")
    run = {**doc["run"], **protocol.run}
    if rounds is not None:
        run["num-rounds"] = rounds
    return parse_experiment({"experiment": experiment, "run": run,
                             "methods": {m: {} for m in methods}},
                            source=str(path.relative_to(ROOT)))


# ------------------------------------------------------------------------- summarising
@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for one value) and count of one figure."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """The statistics of ``values`` (NaN mean with none)."""
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        return cls(mean, math.sqrt(var), n)


@dataclass(frozen=True)
class MethodSummary:
    """One row of a protocol's table: a method (or the original / retrained model) over
    its seeds."""

    label: str
    seeds: int
    accuracy_gap: Stat  # test accuracy − the retrained reference's, as a fraction
    backdoor: Stat
    forgotten_accuracy: Stat
    mia_auc: Stat
    mia_interval: tuple[float, float] | None  # the per-seed bootstrap bounds, averaged
    mia_within_noise: tuple[int, int] | None  # (seeds within noise of retrained, seeds)
    client_epoch_ratio: Stat  # cost / the reference's cost
    wall_ratio: Stat
    reference: bool = False  # the original or retrained model, not a method
    pareto: bool = False


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``results.csv``."""
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _number(row: Mapping[str, str], column: str) -> float | None:
    text = row.get(column, "")
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _values(rows: Sequence[Mapping[str, str]], column: str) -> list[float]:
    return [v for r in rows if (v := _number(r, column)) is not None]


def _ratios(rows: Sequence[Mapping[str, str]], cost: str, reference: str) -> list[float]:
    out = []
    for row in rows:
        num, den = _number(row, cost), _number(row, reference)
        if num is not None and den is not None and den > 0:
            out.append(num / den)
    return out


def _gaps(rows: Sequence[Mapping[str, str]], model: str) -> list[float]:
    out = []
    for row in rows:
        acc = _number(row, f"test_accuracy_{model}")
        ref = _number(row, "test_accuracy_retrained")
        if acc is not None and ref is not None:
            out.append(acc - ref)
    return out


def _interval(rows: Sequence[Mapping[str, str]], model: str) -> tuple[float, float] | None:
    lows = _values(rows, f"mia_intervals_loss_auc_{model}_low")
    highs = _values(rows, f"mia_intervals_loss_auc_{model}_high")
    if not lows or len(lows) != len(highs):
        return None
    return sum(lows) / len(lows), sum(highs) / len(highs)


def _within_noise(rows: Sequence[Mapping[str, str]], model: str) -> tuple[int, int] | None:
    flags = [r.get(f"mia_vs_retrained_loss_auc_{model}_within_noise", "") for r in rows]
    known = [f for f in flags if f in ("True", "False")]
    return (sum(f == "True" for f in known), len(known)) if known else None


def _model_row(label: str, rows: Sequence[Mapping[str, str]], model: str, *,
               costs: bool, reference: bool) -> MethodSummary:
    none = Stat.of([])
    return MethodSummary(
        label=label, seeds=len(rows),
        accuracy_gap=Stat.of(_gaps(rows, model)),
        backdoor=Stat.of(_values(rows, f"backdoor_success_{model}")),
        forgotten_accuracy=Stat.of(_values(rows, f"forgotten_accuracy_{model}")),
        mia_auc=Stat.of(_values(rows, f"mia_loss_auc_{model}")),
        mia_interval=_interval(rows, model),
        mia_within_noise=_within_noise(rows, model) if model != "retrained" else None,
        client_epoch_ratio=(Stat.of(_ratios(rows, "cost_client_epochs",
                                            "retrain_cost_client_epochs")) if costs else none),
        wall_ratio=(Stat.of(_ratios(rows, "cost_server_seconds", "retrain_cost_server_seconds"))
                    if costs else none),
        reference=reference,
    )


def summarise(rows: Sequence[Mapping[str, str]], labels: Sequence[str] | None = None
              ) -> list[MethodSummary]:
    """The table of one protocol: the original and retrained models (one row per seed
    taken from any cell of that seed), then each method in ``labels`` order (default: as
    they first appear), the Pareto front marked among the methods."""
    done = [r for r in rows if r.get("status") == "done"]
    per_seed = list({r["seed"]: r for r in done}.values())
    table = [_model_row("original", per_seed, "original", costs=False, reference=True)]
    retrained = _model_row("retrained", per_seed, "retrained", costs=False, reference=True)
    table.append(_with_ratios_of_one(retrained))
    order = list(labels) if labels is not None else list(dict.fromkeys(r["label"] for r in done))
    methods = [_model_row(label, mrows, "unlearned", costs=True, reference=False)
               for label in order if (mrows := [r for r in done if r["label"] == label])]
    front = pareto_front([(abs(m.accuracy_gap.mean), m.client_epoch_ratio.mean)
                          for m in methods])
    return table + [_marked(m, i in front) for i, m in enumerate(methods)]


def _with_ratios_of_one(row: MethodSummary) -> MethodSummary:
    """The retrained reference: its cost ratios are 1 by definition."""
    one = Stat(1.0, 0.0, row.seeds) if row.seeds else Stat.of([])
    return dataclasses.replace(row, client_epoch_ratio=one, wall_ratio=one)


def _marked(row: MethodSummary, pareto: bool) -> MethodSummary:
    return dataclasses.replace(row, pareto=pareto)


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point dominates (both coordinates lower is better:
    another point at most as large in both and smaller in one dominates); a point with a
    NaN coordinate is on no front."""
    finite = [i for i, (a, b) in enumerate(points) if math.isfinite(a) and math.isfinite(b)]
    front = set()
    for i in finite:
        a, b = points[i]
        if not any(points[j][0] <= a and points[j][1] <= b
                   and (points[j][0] < a or points[j][1] < b) for j in finite if j != i):
            front.add(i)
    return front


# ------------------------------------------------------------------------------ output
HEADER = ("model", "seeds", "Δ test acc (pts)", "backdoor %", "forgotten acc %",
          "MIA AUC (loss) [95% CI]", "MIA ≈ retrained", "client-epochs / retrain",
          "wall / retrain", "front")


def _fmt(stat: Stat, *, scale: float = 1.0, digits: int = 2, signed: bool = False,
         spec: str = "f") -> str:
    if stat.n == 0:
        return "—"
    sign = "+" if signed else ""
    mean = format(scale * stat.mean, f"{sign}.{digits}{spec}")
    if mean.lstrip("+-").strip("0.") == "" and signed:
        mean = format(0.0, f".{digits}{spec}")  # "-0.00" / "+0.00" read as 0
    if stat.n == 1 or stat.std == 0:
        return mean
    return f"{mean} ± {format(scale * stat.std, f'.{digits}{spec}')}"


def table_cells(row: MethodSummary) -> list[str]:
    """The printed cells of one row (in :data:`HEADER` order)."""
    mia = _fmt(row.mia_auc, digits=3)
    if row.mia_interval is not None:
        mia += f" [{row.mia_interval[0]:.3f}, {row.mia_interval[1]:.3f}]"
    noise = ("—" if row.mia_within_noise is None
             else f"{row.mia_within_noise[0]}/{row.mia_within_noise[1]}")
    return [row.label, str(row.seeds), _fmt(row.accuracy_gap, scale=100, signed=True),
            _fmt(row.backdoor, scale=100), _fmt(row.forgotten_accuracy, scale=100), mia, noise,
            _fmt(row.client_epoch_ratio, digits=3, spec="g"),
            _fmt(row.wall_ratio, digits=3, spec="g"), "*" if row.pareto else ""]


def markdown_table(rows: Sequence[MethodSummary]) -> list[str]:
    """A markdown table of a protocol's rows."""
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 2) + [":---:"]) + "|"]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return lines


def write_plot(tables: Mapping[str, Sequence[MethodSummary]], path: str | Path,
               titles: Mapping[str, str] | None = None) -> Path | None:
    """Accuracy gap against the client-epoch ratio (symmetric log x: log above 0.01, linear
    down to 0 for the methods that ask no client for work), one panel per protocol;
    ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    labels = list(dict.fromkeys(r.label for rows in tables.values() for r in rows
                                if not r.reference))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, max(1, len(tables)), figsize=(5.2 * max(1, len(tables)), 4.4),
                             squeeze=False)
    for number, (ax, (name, rows)) in enumerate(zip(axes[0], tables.items(), strict=False)):
        ax.axhline(0.0, color="grey", ls="--", lw=1, label="retrained (0 gap, ratio 1)")
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        for row in rows:
            x, y = row.client_epoch_ratio, row.accuracy_gap
            if row.reference or x.n == 0 or y.n == 0:
                continue
            ax.errorbar([x.mean], [100 * y.mean], xerr=[x.std], yerr=[100 * y.std],
                        fmt="*" if row.pareto else "o", ms=10 if row.pareto else 6,
                        color=colours[row.label], label=row.label, capsize=3)
            ax.annotate(row.label, (x.mean, 100 * y.mean), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(left=-0.002)
        ax.set_xlabel("client-epochs / retraining's (symlog; 0 = no client work)")
        ax.set_ylabel("test accuracy − retrained (points)")
        ax.set_title((titles or {}).get(name, name), fontsize=9)
        ax.grid(alpha=0.3)
        if number == 0:  # the same colours in every panel; the points are labelled too
            ax.legend(fontsize=6, loc="best")
    fig.suptitle("Unlearning: accuracy gap to retraining against client cost "
                 "(mean ± std over seeds; ★ Pareto front)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- main
def _command(argv: Sequence[str]) -> str:
    return " ".join([".venv/bin/python", "benchmarks/bench_pareto.py", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/pareto, runs/pareto-quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes of the experiment runner (one training run "
                             "and its cells each)")
    parser.add_argument("--protocols", nargs="+", default=None,
                        choices=[p.name for p in PROTOCOLS])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these registered methods (default: every whole-client one)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: seed 0, {QUICK_ROUNDS} rounds, "
                             f"{', '.join(QUICK_METHODS)}")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected an integer >= 1")

    from _common import environment

    from fedforget.engine.apps import find_project
    from fedforget.experiments import run_experiment
    from fedforget.experiments.table import RESULTS_CSV
    from fedforget.unlearning import METHODS

    eligible, skipped = whole_client_methods()
    if args.methods is not None:
        for name in args.methods:
            METHODS.get(name)  # an unknown name is an error
            if name in skipped:
                parser.error(f"--methods {name}: it {skipped[name]}; this benchmark asks "
                             "whole-client requests")
        eligible = [m for m in eligible if m in args.methods]
    elif args.quick:
        eligible = [m for m in eligible if m in QUICK_METHODS]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out or ("runs/pareto-quick" if args.quick else "runs/pareto"))
    protocols = [p for p in PROTOCOLS if args.protocols is None or p.name in args.protocols]
    rounds = QUICK_ROUNDS if args.quick else None
    project = find_project(ROOT)

    print(environment())
    print(f"command: {_command(argv)}")
    for name, why in skipped.items():
        print(f"skipped {name}: it {why} (this benchmark forgets whole clients)")
    specs = []
    for protocol in protocols:
        from fedforget.config import read_toml

        run = {**read_toml(ROOT / "simulations" / protocol.source)["run"], **protocol.run}
        methods, reasons = protocol_methods(run, eligible)
        for name, why in reasons.items():
            print(f"skipped {name} on {protocol.name}: it {why}")
        specs.append((protocol, build_spec(protocol, methods, seeds=seeds, rounds=rounds)))
    total = sum(len(spec.cells()) for _, spec in specs)
    print(f"{len(specs)} protocols, {total} cells, seeds {' '.join(map(str, seeds))}, "
          f"{args.workers} worker(s) -> {out}", flush=True)

    tables: dict[str, list[MethodSummary]] = {}
    t_all = time.perf_counter()
    for number, (protocol, spec) in enumerate(specs, start=1):
        print(f"[protocol {number}/{len(specs)}] {protocol.name}: {protocol.title}, "
              f"{spec.base['num-rounds']} rounds; {len(spec.cells())} cells", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        folder = out / protocol.name
        run_experiment(spec, folder, project=project, workers=args.workers)
        print(f"[protocol {number}/{len(specs)}] {protocol.name}: done in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        tables[protocol.name] = summarise(read_rows(folder / RESULTS_CSV),
                                          [m.label for m in spec.methods])
    elapsed = time.perf_counter() - t_all

    lines = [f"# Pareto benchmark ({'quick' if args.quick else 'full'})", "",
             f"- command: `{_command(argv)}`", f"- machine: {environment()}",
             f"- {total} cells in {elapsed:.0f} s; seeds {', '.join(map(str, seeds))}",
             "- Δ test acc: test accuracy − the retrained reference's (same seed), points; "
             "MIA: loss-attack AUC on the forgotten clients' data against their held-out data, "
             "[95% stratified-bootstrap bounds averaged over seeds], `≈ retrained`: seeds whose "
             "paired difference to the retrained model is within noise; ratios: the method's "
             "cost / the reference retraining's; `*`: Pareto front of |Δ test acc| against "
             "client-epochs.", ""]
    titles = {p.name: f"{p.title}, {spec.base['num-rounds']} rounds" for p, spec in specs}
    for name, rows in tables.items():
        lines += [f"## {titles[name]}", "", *markdown_table(rows), ""]
    plot = write_plot(tables, out / "pareto.png", titles)
    lines += [f"![accuracy gap against cost]({plot.name})" if plot is not None
              else "(no plot: matplotlib is not installed)", ""]
    text = "\n".join(lines)
    (out / "pareto.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out / 'pareto.md'}" + (f", {plot}" if plot is not None else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

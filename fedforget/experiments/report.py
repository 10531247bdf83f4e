"""The report of an experiment: markdown tables (mean ± std over seeds) and plots.

One table per grid point: the original model, the retrained reference, then each method,
with test accuracy, accuracy on the forgotten clients' data, backdoor success, membership
inference, distance to the retrained model, the worst per-client accuracy change, and cost.
Plots (``plots/``): accuracy against cost for each method, accuracy per round during
unlearning, and the per-client impact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedforget.experiments.spec import ExperimentSpec
from fedforget.experiments.table import flatten_cell
from fedforget.fileio import write_atomic

__all__ = ["mean_std", "summarise", "write_report"]

REPORT = "report.md"
PLOTS = "plots"

# (header, number format, column of the original model, of the retrained one, of a method)
_Column = tuple[str, str, str | None, str | None, str | None]
COLUMNS: tuple[_Column, ...] = (
    ("test acc", "pct", "test_accuracy_original", "test_accuracy_retrained",
     "test_accuracy_unlearned"),
    ("forgotten acc", "pct", "forgotten_accuracy_original", "forgotten_accuracy_retrained",
     "forgotten_accuracy_unlearned"),
    ("backdoor", "pct", "backdoor_success_original", "backdoor_success_retrained",
     "backdoor_success_unlearned"),
    ("MIA AUC (loss)", "3f", "mia_loss_auc_original", "mia_loss_auc_retrained",
     "mia_loss_auc_unlearned"),
    ("shadow P", "3f", "shadow_attack_original_precision", "shadow_attack_retrained_precision",
     "shadow_attack_unlearned_precision"),
    ("shadow R", "3f", "shadow_attack_original_recall", "shadow_attack_retrained_recall",
     "shadow_attack_unlearned_recall"),
    ("L2 to retrained", "3f", "l2_to_retrained_original", None, "l2_to_retrained_unlearned"),
    ("KL to retrained", "4f", "kl_to_retrained_original", None, "kl_to_retrained_unlearned"),
    ("worst client Δacc", "pp", None, None, "client_impact_min"),
    ("client-epochs", "g", None, "retrain_cost_client_epochs", "cost_client_epochs"),
    ("wall s", "2f", None, "retrain_cost_server_seconds", "cost_server_seconds"),
    ("speed-up (wall)", "x", None, None, "speedup_wall"),
)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


def _numbers(rows: Sequence[Mapping[str, Any]], column: str | None) -> list[float]:
    if column is None:
        return []
    out = []
    for row in rows:
        value = row.get(column)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out.append(float(value))
    return out


def _fmt(kind: str, mean: float, std: float, n: int) -> str:
    if n == 0:
        return "—"

    def one(v: float, signed: bool = True) -> str:
        if kind == "pct":
            return f"{100 * v:.2f}"
        if kind == "pp":
            return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"
        if kind == "x":
            return f"{v:.2f}×"
        if kind == "g":
            return f"{v:.4g}"
        return format(v, "." + kind)

    def unsigned_zero(text: str) -> str:  # "-0.0000" (a rounding of -1e-12) reads as 0
        digits = text.rstrip("×")
        return text[1:] if text.startswith("-") and float(digits) == 0 else text

    if n == 1 or std == 0:
        return unsigned_zero(one(mean))
    return f"{unsigned_zero(one(mean))} ± {one(std, False).rstrip('×')}"


def _point_key(row: Mapping[str, Any], grid_keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in grid_keys)


def _point_title(key: tuple[Any, ...], grid_keys: Sequence[str]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in zip(grid_keys, key, strict=True)) or "all runs"


def summarise(spec: ExperimentSpec, records: Sequence[Mapping[str, Any]]
              ) -> dict[tuple[Any, ...], list[tuple[str, list[str]]]]:
    """Per grid point, the table rows ``(model, [cells...])`` of the report."""
    rows = [flatten_cell(r) for r in records if r.get("status") == "done"]
    grid_keys = list(spec.grid)
    out: dict[tuple[Any, ...], list[tuple[str, list[str]]]] = {}
    for key in dict.fromkeys(_point_key(r, grid_keys) for r in rows):
        point_rows = [r for r in rows if _point_key(r, grid_keys) == key]
        # The original and retrained models are the same in every method's cell of a seed:
        # take one row per seed for them.
        per_seed = list({r["seed"]: r for r in point_rows}.values())
        table: list[tuple[str, list[str]]] = []
        for name, index in (("original", 2), ("retrained", 3)):
            table.append((name, [
                _fmt(c[1], *mean_std(_numbers(per_seed, c[index]))) for c in COLUMNS
            ]))
        for method in spec.methods:
            mrows = [r for r in point_rows if r["label"] == method.label]
            if not mrows:
                continue
            table.append((method.label, [
                _fmt(c[1], *mean_std(_numbers(mrows, c[4]))) for c in COLUMNS
            ]))
        out[key] = table
    return out


def write_report(out: str | Path, spec: ExperimentSpec,
                 records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``out``; return the report's path."""
    out = Path(out)
    plots = _write_plots(out, spec, records)
    grid_keys = list(spec.grid)
    done = [r for r in records if r.get("status") == "done"]
    noop = [r for r in records if r.get("status") == "no-op"]
    lines = [
        f"# Experiment `{spec.name}`",
        "",
        *( [spec.description.strip(), ""] if spec.description.strip() else [] ),
        f"- experiment file: `{spec.source}` (fingerprint `{spec.fingerprint[:12]}`)",
        f"- command: `fedforget run {_relative(spec.source)} --out {_relative(out)}`",
        f"- cells: {len(records)} of {len(spec.cells())} finished"
        + (f" ({len(noop)} no-op: the client never contributed)" if noop else ""),
        f"- seeds: {', '.join(map(str, spec.seeds))}; forgotten: {', '.join(spec.forget)}; "
        f"engine: {spec.engine}",
        f"- grid: {', '.join(f'{k} in {list(v)}' for k, v in spec.grid.items()) or 'none'}",
        "",
        "Figures are mean ± sample standard deviation over the seeds (a single number when "
        "there is one seed or no spread). Accuracies and the worst client's accuracy change "
        "are in percent (points); `original` is the trained model before unlearning, "
        "`retrained` the reference retrained from scratch without the forgotten clients. "
        "MIA: membership inference on the forgotten clients' training data against their "
        "held-out data (AUC 0.5 = cannot tell); shadow P / R: precision and recall of the "
        "shadow-model attack. Costs: client-epochs and server wall time of the unlearning; "
        "speed-up = retraining's wall time / the method's.",
        "",
    ]
    header = ["model", *(c[0] for c in COLUMNS)]
    for key, table in summarise(spec, done).items():
        lines += [f"## {_point_title(key, grid_keys)}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for name, cells in table:
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    extra = sorted({k for r in done for k in r.get("extra_metrics", {})})
    if extra:
        lines += ["## Extra metrics", "", "| point | method | " + " | ".join(extra) + " |",
                  "|---|---|" + "---:|" * len(extra)]
        for key in dict.fromkeys(_point_key(r["grid"], grid_keys) for r in done):
            for method in spec.methods:
                mrows = [r for r in done if r["label"] == method.label
                         and _point_key(r["grid"], grid_keys) == key]
                if not mrows:
                    continue
                cells = [_fmt("4f", *mean_std([float(r["extra_metrics"][k]) for r in mrows
                                               if k in r["extra_metrics"]])) for k in extra]
                lines.append(f"| {_point_title(key, grid_keys)} | {method.label} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    from fedforget.experiments.collateral import collateral_plots, collateral_section

    lines += collateral_section(spec, done)
    plots += collateral_plots(out, spec, done)
    worst = _worst_clients(done, spec)
    if worst:
        lines += ["## Clients hurt most by unlearning", "",
                  "Per method, the remaining clients whose held-out accuracy dropped most "
                  "(mean change over seeds, points):", ""]
        lines += worst + [""]
    if plots:
        lines += ["## Plots", ""]
        for title, path in plots:
            lines += [f"### {title}", "", f"![{title}]({path.relative_to(out)})", ""]
    else:
        lines += ["(No plots: matplotlib is not installed.)", ""]
    return write_atomic(out / REPORT, "\n".join(lines))


def _relative(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _impact_changes(record: Mapping[str, Any]) -> Mapping[str, float]:
    impact = (record.get("result") or {}).get("metrics", {}).get("client_impact") or {}
    changes = impact.get("changes") or {}
    return {str(k): float(v) for k, v in changes.items()}


def _worst_clients(records: Sequence[Mapping[str, Any]], spec: ExperimentSpec) -> list[str]:
    grid_keys = list(spec.grid)
    points = list(dict.fromkeys(_point_key(r["grid"], grid_keys) for r in records))
    lines = []
    for key in points:
        point = [r for r in records if _point_key(r["grid"], grid_keys) == key]
        if grid_keys:
            lines.append(f"- {_point_title(key, grid_keys)}:")
        for method in spec.methods:
            per_client: dict[str, list[float]] = {}
            for r in point:
                if r["label"] == method.label:
                    for cid, change in _impact_changes(r).items():
                        per_client.setdefault(cid, []).append(change)
            if not per_client:
                continue
            means = sorted((sum(v) / len(v), cid) for cid, v in per_client.items())[:3]
            lines.append(f"{'  ' if grid_keys else ''}- {method.label}: "
                         + ", ".join(f"{cid} {100 * m:+.2f}" for m, cid in means))
    return lines


# ------------------------------------------------------------------------------ plots
def _trace(record: Mapping[str, Any]) -> list[tuple[int, float]]:
    result = record.get("result") or {}
    trace = result.get("metrics", {}).get("trace") or result.get("trace") or []
    return [(int(p["round"]), float(p["test_accuracy"])) for p in trace]


def _write_plots(out: Path, spec: ExperimentSpec, records: Sequence[Mapping[str, Any]]
                 ) -> list[tuple[str, Path]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    done = [r for r in records if r.get("status") == "done"]
    if not done:
        return []
    grid_keys = list(spec.grid)
    rows = [flatten_cell(r) for r in done]
    keys = list(dict.fromkeys(_point_key(r, grid_keys) for r in rows))
    folder = out / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    colours = {m.label: f"C{i % 10}" for i, m in enumerate(spec.methods)}
    written: list[tuple[str, Path]] = []

    def figure(nrows: int, title: str, draw: Callable[[Any, tuple[Any, ...]], None],
               name: str) -> None:
        fig, axes = plt.subplots(nrows, len(keys), figsize=(max(6.5, 5 * len(keys)), 3.6 * nrows),
                                 squeeze=False)
        for j, key in enumerate(keys):
            draw(axes[:, j], key)
        fig.suptitle(title)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append((title, path))

    def style(ax: Any, key: tuple[Any, ...], xlabel: str, ylabel: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(_point_title(key, grid_keys), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    # 1. accuracy against cost
    def draw_cost(axes: Any, key: tuple[Any, ...]) -> None:
        point = [r for r in rows if _point_key(r, grid_keys) == key]
        per_seed = list({r["seed"]: r for r in point}.values())
        for ax, (cost_col, xlabel) in zip(axes, (
                ("cost_client_epochs", "client-epochs (symlog: 0 = no client work)"),
                ("cost_server_seconds", "server wall time (s, log)"),
        ), strict=True):
            orig = mean_std(_numbers(per_seed, "test_accuracy_original"))
            if orig[2]:
                ax.axhline(orig[0], color="grey", ls="--", lw=1, label="original")
            for method in spec.methods:
                mrows = [r for r in point if r["label"] == method.label]
                x = mean_std(_numbers(mrows, cost_col))
                y = mean_std(_numbers(mrows, "test_accuracy_unlearned"))
                if x[2] and y[2]:
                    ax.errorbar([x[0]], [y[0]], xerr=[x[1]], yerr=[y[1]], fmt="o",
                                color=colours[method.label], label=method.label, capsize=3)
            if cost_col == "cost_client_epochs":
                ax.set_xscale("symlog", linthresh=1.0)
            else:
                ax.set_xscale("log")
            style(ax, key, xlabel, "test accuracy")

    figure(2, "Test accuracy against unlearning cost (mean ± std over seeds)", draw_cost,
           "accuracy_vs_cost.png")

    # 2. accuracy per round during unlearning
    if any(_trace(r) for r in done):
        def draw_trace(axes: Any, key: tuple[Any, ...]) -> None:
            ax = axes[0]
            point = [(r, f) for r, f in zip(done, rows, strict=True)
                     if _point_key(f, grid_keys) == key]
            for method in spec.methods:
                by_round: dict[int, list[float]] = {}
                for r, _ in point:
                    if r["label"] == method.label:
                        for t, acc in _trace(r):
                            by_round.setdefault(t, []).append(acc)
                if by_round:
                    ts = sorted(by_round)
                    ax.plot(ts, [sum(by_round[t]) / len(by_round[t]) for t in ts],
                            marker="." if len(ts) < 40 else None,
                            color=colours[method.label], label=method.label)
            style(ax, key, "round being rebuilt", "test accuracy")

        figure(1, "Accuracy per round during unlearning (mean over seeds)", draw_trace,
               "accuracy_per_round.png")

    # 3. per-client impact
    if any(_impact_changes(r) for r in done):
        def draw_impact(axes: Any, key: tuple[Any, ...]) -> None:
            ax = axes[0]
            point = [r for r, f in zip(done, rows, strict=True)
                     if _point_key(f, grid_keys) == key]
            clients = sorted({c for r in point for c in _impact_changes(r)})
            methods = [m for m in spec.methods
                       if any(r["label"] == m.label and _impact_changes(r) for r in point)]
            width = 0.8 / max(1, len(methods))
            for i, method in enumerate(methods):
                values = []
                for cid in clients:
                    v = [_impact_changes(r)[cid] for r in point
                         if r["label"] == method.label and cid in _impact_changes(r)]
                    values.append(100 * sum(v) / len(v) if v else 0.0)
                ax.bar([c + i * width for c in range(len(clients))], values, width,
                       color=colours[method.label], label=method.label)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks([c + 0.4 - width / 2 for c in range(len(clients))])
            ax.set_xticklabels([c.replace("client-", "") for c in clients], fontsize=7)
            style(ax, key, "remaining client", "held-out accuracy change (points)")

        figure(1, "Per-client impact of unlearning (mean over seeds)", draw_impact,
               "client_impact.png")
    return written

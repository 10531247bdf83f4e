"""The "Who else is hurt" part of an experiment report: collateral harm over seeds, and the
repair step's effect (see :mod:`fedforget.evaluation.collateral` for the figures of one
result).

Per method (mean and 95 % t-interval over the seeds):

* with client groups, each model's accuracy change on the whole test set in the accent of
  the departed client's group and in the others' (``group_accuracy``: the test set is
  large, so these are the precise figures), and the gap between the two;
* the correlation of each remaining client's harm with its representation and label
  similarity to the forgotten data (``collateral.correlation``), and the clients named in
  the hurt group in each seed;
* for a ``repair`` method, how many points of its base method's harm to the departed
  client's group it recovers (paired by seed) and what it costs on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedforget.evaluation.collateral import mean_interval
from fedforget.experiments.spec import ExperimentSpec, MethodSpec

__all__ = ["collateral_plots", "collateral_section", "group_harms"]


def _metrics(record: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((record.get("result") or {}).get("metrics") or {})


def group_harms(record: Mapping[str, Any], model: str = "unlearned"
                ) -> tuple[float, float] | None:
    """(departed group's test-accuracy loss, the other groups' mean loss) of ``model``
    against the original model; None without groups."""
    metrics = _metrics(record)
    groups = metrics.get("group_accuracy")
    forgotten = (metrics.get("collateral") or {}).get("forgotten_groups") or []
    if not groups or not forgotten:
        return None
    loss = {g: v["original"] - v[model] for g, v in groups.items()}
    mine = [loss[str(g)] for g in forgotten if str(g) in loss]
    others = [v for g, v in loss.items() if int(g) not in forgotten]
    if not mine or not others:
        return None
    return sum(mine) / len(mine), sum(others) / len(others)


def _fmt(values: Sequence[float], scale: float = 100.0, signed: bool = True) -> str:
    mean, low, high = mean_interval(list(values))
    if mean is None:
        return "—"
    sign = "+" if signed else ""
    if low is None or high is None:
        return f"{scale * mean:{sign}.2f}"
    return f"{scale * mean:{sign}.2f} [{scale * low:{sign}.2f}, {scale * high:{sign}.2f}]"


def _done(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "done"]


def _base_label(spec: ExperimentSpec, method: MethodSpec) -> str | None:
    """The label of the cell a repair method repairs (same base method and parameters)."""
    if method.method != "repair":
        return None
    base = method.params.get("base")
    params = dict(method.params.get("base-params") or {})
    from fedforget.unlearning import get_method

    try:
        wanted = get_method(str(base), params).params.to_dict()
    except Exception:  # noqa: BLE001 - a report never fails on a spec it cannot match
        return None
    for other in spec.methods:
        if other.method == base and dict(other.params) == wanted:
            return other.label
    return None


def collateral_section(spec: ExperimentSpec, records: Sequence[Mapping[str, Any]]
                       ) -> list[str]:
    """Markdown lines of the section (empty when no result has collateral figures)."""
    done = _done(records)
    if not any(_metrics(r).get("collateral") for r in done):
        return []
    grid_keys = list(spec.grid)
    points = list(dict.fromkeys(tuple(r["grid"].get(k) for k in grid_keys) for r in done))
    lines = ["## Who else is hurt", "",
             "Harm = accuracy lost against the original model, in points (mean and 95 % "
             "t-interval over the seeds). With client groups, the harm is measured on the "
             "whole test set in the accent of the departed client's group and of the other "
             "groups. r: Pearson correlation over the remaining clients between a client's "
             "harm (on its own held-out data) and its similarity to the forgotten data "
             "(mean over seeds and 95 % interval); hurt: the clients whose harm is "
             "significantly above the rest's (Holm, 5 %), per seed. A repair row also says "
             "how many points of its base method's harm to the departed group it recovers "
             "(paired by seed) and its extra client-epochs.", ""]
    for key in points:
        point = [r for r in done if tuple(r["grid"].get(k) for k in grid_keys) == key]
        if grid_keys:
            lines += [f"### {', '.join(f'{k} = {v}' for k, v in zip(grid_keys, key, strict=True))}",
                      ""]
        with_groups = any(group_harms(r) for r in point)
        header = ["model"]
        if with_groups:
            header += ["departed group's harm", "other groups' harm", "gap"]
        header += ["r (representation)", "r (label)", "hurt (per seed)", "repair recovers",
                   "repair client-epochs"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|" + "---:|" * (len(header) - 2) + "---|")
        by_seed_retrained = {r["seed"]: r for r in point}
        if with_groups:
            harms = [h for r in by_seed_retrained.values()
                     if (h := group_harms(r, "retrained")) is not None]
            if harms:
                row = ["retrained (exact)", _fmt([h[0] for h in harms]),
                       _fmt([h[1] for h in harms]), _fmt([h[0] - h[1] for h in harms]),
                       "", "", "", "", ""]
                lines.append("| " + " | ".join(row) + " |")
        for method in spec.methods:
            rows = [r for r in point if r["label"] == method.label]
            if not rows:
                continue
            cells = [method.label]
            if with_groups:
                harms = [h for r in rows if (h := group_harms(r)) is not None]
                cells += [_fmt([h[0] for h in harms]), _fmt([h[1] for h in harms]),
                          _fmt([h[0] - h[1] for h in harms])]
            for kind in ("representation", "label"):
                rs = [c["r"] for r in rows
                      if (c := ((_metrics(r).get("collateral") or {}).get("correlation") or {})
                          .get(kind)) and c.get("r") is not None]
                cells.append(_fmt(rs, scale=1.0, signed=False) if rs else "—")
            hurt = ["; ".join(
                f"s{r['seed']}: {', '.join(c.replace('client-', '') for c in (_metrics(r).get('collateral') or {}).get('hurt') or []) or '—'}"  # noqa: E501
                for r in rows)]
            cells += hurt
            base = _base_label(spec, method)
            recovered, extra = "", ""
            if base is not None:
                base_rows = {r["seed"]: r for r in point if r["label"] == base}
                diffs, costs = [], []
                for r in rows:
                    b = base_rows.get(r["seed"])
                    if b is None:
                        continue
                    hb, hr = group_harms(b), group_harms(r)
                    if hb is not None and hr is not None:
                        diffs.append(hb[0] - hr[0])
                    costs.append(r["result"]["cost"]["client_epochs"]
                                 - b["result"]["cost"]["client_epochs"])
                recovered = f"{_fmt(diffs)} (vs {base})" if diffs else f"(vs {base})"
                extra = _fmt(costs, scale=1.0, signed=False) if costs else ""
            cells += [recovered, extra]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def collateral_plots(out: Path, spec: ExperimentSpec, records: Sequence[Mapping[str, Any]]
                     ) -> list[tuple[str, Path]]:
    """Two plots: each remaining client's harm against its representation similarity (one
    panel per method, every seed), and the group harms per method with their intervals."""
    done = _done(records)
    if not any(_metrics(r).get("collateral") for r in done):
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []
    methods = [m for m in spec.methods if any(r["label"] == m.label for r in done)]
    cols = min(4, len(methods))
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.0 * nrows), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for r in done:
            if r["label"] != method.label:
                continue
            clients = (_metrics(r).get("collateral") or {}).get("clients") or {}
            hurt = set((_metrics(r).get("collateral") or {}).get("hurt") or [])
            for cid, c in clients.items():
                if c.get("representation_similarity") is None:
                    continue
                group = c.get("group")
                ax.scatter(c["representation_similarity"], 100 * c["harm"], s=26,
                           color=f"C{group if group is not None else 0}",
                           marker="*" if cid in hurt else "o", alpha=0.8)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(method.label, fontsize=9)
        ax.set_xlabel("representation similarity", fontsize=8)
        ax.set_ylabel("harm (points)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("Each remaining client's harm against its similarity to the forgotten data "
                 "(colour: group; star: named hurt)", fontsize=9)
    fig.tight_layout()
    path = folder / "collateral_similarity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(("Collateral harm against similarity", path))

    if any(group_harms(r) for r in done):
        labels = ["retrained", *[m.label for m in methods]]
        mine, others = [], []
        for label in labels:
            if label == "retrained":
                rows = list({r["seed"]: r for r in done}.values())
                hs = [h for r in rows if (h := group_harms(r, "retrained")) is not None]
            else:
                hs = [h for r in done if r["label"] == label
                      if (h := group_harms(r)) is not None]
            mine.append(mean_interval([100 * h[0] for h in hs]))
            others.append(mean_interval([100 * h[1] for h in hs]))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(labels)), 3.6))
        xs = range(len(labels))
        for offset, series, name, colour in ((-0.2, mine, "departed client's group", "C3"),
                                             (0.2, others, "other groups", "C0")):
            means = [s[0] if s[0] is not None else 0.0 for s in series]
            errs = [[m - (s[1] if s[1] is not None else m) for m, s in zip(means, series,
                                                                           strict=True)],
                    [(s[2] if s[2] is not None else m) - m for m, s in zip(means, series,
                                                                           strict=True)]]
            ax.bar([x + offset for x in xs], means, 0.4, yerr=errs, capsize=3, color=colour,
                   label=name)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8, rotation=20)
        ax.set_ylabel("test accuracy lost (points)")
        ax.set_title("Harm by group (mean and 95 % interval over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = folder / "collateral_groups.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(("Collateral harm by group, and the repair's effect", path))
    return written

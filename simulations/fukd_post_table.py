"""Print the table of simulations/RESULTS.md's "FUKD with post-training rounds".

Reads the ``results.csv`` of ``fedforget run simulations/fukd_post.toml`` (or
``fukd_post_seeds.toml``) and prints, per method label, mean ± sample std over the seeds of
the test accuracy, its difference to the same seed's retrained model, how many seeds are
within 1 point of it, the backdoor success, the client-epochs and their fraction of the same
cell's retraining::

    python simulations/fukd_post_table.py simulations/results/fukd-post/results.csv
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections.abc import Sequence


def _stat(values: Sequence[float], spec: str = ".2f") -> str:
    mean = format(statistics.mean(values), spec)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean if spread < 5e-3 else f"{mean} ± {format(spread, spec.lstrip('+'))}"


def table(rows: Sequence[dict[str, str]]) -> list[str]:
    """The markdown lines: the original model, then each label in order of appearance."""
    labels = list(dict.fromkeys(r["label"] for r in rows if r["status"] == "done"))
    per_seed = list({r["seed"]: r for r in rows if r["status"] == "done"}.values())
    lines = ["| method | test acc | Δ to retrain | seeds within 1 pt | backdoor | client-epochs "
             "| of retraining's |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| original | {_stat([100 * float(r['test_accuracy_original']) for r in per_seed])}"
             f" | — | — | {_stat([100 * float(r['backdoor_success_original']) for r in per_seed])}"
             " | — | — |"]
    for label in labels:
        cells = [r for r in rows if r["label"] == label and r["status"] == "done"]
        acc = [100 * float(r["test_accuracy_unlearned"]) for r in cells]
        gap = [100 * (float(r["test_accuracy_unlearned"]) - float(r["test_accuracy_retrained"]))
               for r in cells]
        epochs = [float(r["cost_client_epochs"]) for r in cells]
        share = [100 * float(r["cost_client_epochs"]) / float(r["retrain_cost_client_epochs"])
                 for r in cells]
        within = sum(abs(g) <= 1 + 1e-9 for g in gap)
        lines.append(
            f"| {label} | {_stat(acc)} | "
            + ("0" if max(map(abs, gap)) == 0 else _stat(gap, "+.2f").replace("-", "−"))
            + f" | {within}/{len(gap)} | "
            f"{_stat([100 * float(r['backdoor_success_unlearned']) for r in cells])} | "
            f"{_stat(epochs, 'g')} | {_stat(share)}% |")
    return lines


def main(argv: Sequence[str]) -> int:
    rows: list[dict[str, str]] = []
    for path in argv:
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

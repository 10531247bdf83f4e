"""Record- and class-level erasure on digits: exact and approximate methods side by side.

    .venv/bin/python simulations/erasure_requests.py [--seeds 0 1 2] [--out runs/requests]

For each seed: train the digits federation of ``simulations/demo.toml`` (10 clients,
Dirichlet(0.5) labels) for 20 rounds without its backdoor; then

* client-002 asks to have 40 of its training records forgotten (it stays): ``retrain``,
  ``rollback`` (exact) and ``rapid-retrain`` (Liu et al., INFOCOM 2022);
* the federation forgets class 3: ``retrain``, ``rollback`` (exact) and ``fucp`` (Wang et
  al., WWW 2022).

Every method starts from the trained model. The table gives mean ± standard deviation over
the seeds: test accuracy, accuracy on what was forgotten (the 40 records; the test examples
of class 3), on the other classes (class requests), cost in client-epochs, whether the model
equals the retrained one bit for bit. Results: ``simulations/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedforget.config import load_config  # noqa: E402
from fedforget.engine import run_training, run_unlearning  # noqa: E402
from fedforget.task import load_client_data  # noqa: E402
from fedforget.withdrawal import WithdrawalLedger  # noqa: E402

REQUESTS = (
    ("records", "retrain", {}), ("records", "rollback", {}), ("records", "rapid-retrain", {}),
    ("class", "retrain", {}), ("class", "rollback", {}), ("class", "fucp", {}),
)


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v == v]  # NaN: not measured
    if not values:
        return "—"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return (f"{scale * statistics.mean(values):.{digits}f} ± "
            f"{scale * statistics.stdev(values):.{digits}f}")


def _column(results: list[dict[str, float]], name: str, scale: float = 100.0,
            digits: int = 2) -> str:
    return _mean_std([r[name] for r in results if name in r], scale, digits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/requests")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in args.seeds:
        cfg = load_config(ROOT / "simulations" / "demo.toml", seed=seed, **{
            "num-rounds": 20, "backdoor-clients": "", "history-fsync": False})
        run = Path(args.out) / f"seed{seed}"
        if not (run / "history.sqlite").exists():
            run_training(cfg, out=run, progress=False)
        with WithdrawalLedger(run) as ledger:
            if ledger.all():  # requests accumulate: earlier ones would stay in force
                raise SystemExit(f"{run} already holds erasure requests; give a new --out")
        ids = load_client_data(cfg, 2)[0].record_ids()[:40]
        for kind, method, params in REQUESTS:
            (run / "unlearned" / "current.json").unlink(missing_ok=True)
            outcome = run_unlearning(
                run, client="client-002" if kind == "records" else "operator", method=method,
                params=params, records=ids if kind == "records" else None,
                labels=[3] if kind == "class" else None, progress=False, reference="compute")
            assert outcome is not None
            m = outcome.metrics
            forgotten = (m["forgotten_accuracy"] if kind == "records"
                         else m["forgotten_class_accuracy"])
            row = {"test": m["test_accuracy"]["unlearned"],
                   "test_retrained": m["test_accuracy"]["retrained"],
                   "forgotten": forgotten["unlearned"],
                   "forgotten_retrained": forgotten["retrained"],
                   "forgotten_original": forgotten["original"],
                   "epochs": outcome.cost.client_epochs,
                   "mia": (m.get("mia_loss_auc") or {}).get("unlearned", float("nan")),
                   "mia_retrained": (m.get("mia_loss_auc") or {}).get("retrained",
                                                                      float("nan")),
                   "mia_original": (m.get("mia_loss_auc") or {}).get("original",
                                                                     float("nan")),
                   "identical": float(bool(outcome.bit_identical))}
            if kind == "class":
                row["others"] = m["retained_class_accuracy"]["unlearned"]
                row["others_retrained"] = m["retained_class_accuracy"]["retrained"]
            rows.setdefault((kind, method), []).append(row)
            print(f"seed {seed} {kind:7} {method:13} test {row['test']:.4f} forgotten "
                  f"{row['forgotten']:.4f} (retrained {row['forgotten_retrained']:.4f}) "
                  f"{row['epochs']:g} client-epochs", file=sys.stderr)
    print("| request | method | test acc | retrained | forgotten acc | retrained | original "
          "| other classes | retrained | MIA AUC | retrained | original | client-epochs "
          "| bit-identical |")
    print("|---|---|" + "---:|" * 12)
    for (kind, method), results in rows.items():
        col = functools.partial(_column, results)
        print(f"| {kind} | {method} | {col('test')} | {col('test_retrained')} | "
              f"{col('forgotten')} | {col('forgotten_retrained')} | "
              f"{col('forgotten_original')} | {col('others')} | {col('others_retrained')} | "
              f"{col('mia', 1.0, 3)} | {col('mia_retrained', 1.0, 3)} | "
              f"{col('mia_original', 1.0, 3)} | {col('epochs', 1.0, 0)} | "
              f"{sum(r['identical'] for r in results):g}/{len(results)} |")
    print(f"\n{len(args.seeds)} seeds in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Pareto benchmark's summary (benchmarks/bench_pareto.py) on a hand-made results.csv.

No experiment is run: the rows below are written by hand, with numbers chosen to be exact in
binary, and every expected figure is worked out in the comments.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench() -> ModuleType:
    path = ROOT / "benchmarks" / "bench_pareto.py"
    spec = importlib.util.spec_from_file_location("bench_pareto", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pareto"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

# Two seeds. Seed 0: original test acc 0.75, retrained 0.875, retraining costs 640
# client-epochs and 8 s; seed 1: 0.625, 0.75, 640 client-epochs and 4 s.
REFERENCE: dict[int, dict[str, float]] = {
    0: {"test_accuracy_original": 0.75, "test_accuracy_retrained": 0.875,
        "backdoor_success_original": 0.5, "backdoor_success_retrained": 0.0,
        "forgotten_accuracy_original": 1.0, "forgotten_accuracy_retrained": 0.5,
        "mia_loss_auc_original": 0.75, "mia_loss_auc_retrained": 0.5,
        "mia_intervals_loss_auc_retrained_low": 0.25,
        "mia_intervals_loss_auc_retrained_high": 0.75,
        "retrain_cost_client_epochs": 640, "retrain_cost_server_seconds": 8.0},
    1: {"test_accuracy_original": 0.625, "test_accuracy_retrained": 0.75,
        "backdoor_success_original": 0.25, "backdoor_success_retrained": 0.0,
        "forgotten_accuracy_original": 1.0, "forgotten_accuracy_retrained": 0.5,
        "mia_loss_auc_original": 0.75, "mia_loss_auc_retrained": 0.5,
        "mia_intervals_loss_auc_retrained_low": 0.25,
        "mia_intervals_loss_auc_retrained_high": 0.75,
        "retrain_cost_client_epochs": 640, "retrain_cost_server_seconds": 4.0},
}
# (label, seed): test acc, backdoor, forgotten acc, MIA AUC, its bounds, within noise,
# client-epochs, server seconds
METHOD_ROWS: dict[tuple[str, int], tuple[Any, ...]] = {
    ("retrain", 0): (0.875, 0.0, 0.5, 0.5, 0.25, 0.75, "True", 640, 8.0),
    ("retrain", 1): (0.75, 0.0, 0.5, 0.5, 0.25, 0.75, "True", 640, 4.0),
    ("subtract", 0): (0.75, 0.0625, 0.75, 0.5, 0.375, 0.625, "True", 0, 0.08),
    ("subtract", 1): (0.5, 0.0625, 0.5, 0.75, 0.625, 0.875, "False", 0, 0.02),
    ("pga", 0): (0.9375, 0.0, 0.5, 0.5, 0.25, 0.75, "True", 128, 2.0),
    ("pga", 1): (0.8125, 0.125, 0.5, 0.5, 0.25, 0.75, "True", 192, 2.0),
    ("sifu", 0): (0.8125, 0.0, 0.5, 0.5, 0.25, 0.75, "True", 640, 8.0),
    ("sifu", 1): (0.6875, 0.0, 0.5, 0.5, 0.25, 0.75, "True", 640, 4.0),
}


def _write_results(path: Path) -> Path:
    rows = []
    for (label, seed), values in METHOD_ROWS.items():
        acc, backdoor, forgotten, auc, low, high, noise, epochs, seconds = values
        rows.append({
            "cell_id": f"seed{seed}-{label}", "experiment": "pareto-test", "seed": seed,
            "label": label, "method": label, "forget": "client-003", "status": "done",
            **REFERENCE[seed],
            "test_accuracy_unlearned": acc, "backdoor_success_unlearned": backdoor,
            "forgotten_accuracy_unlearned": forgotten, "mia_loss_auc_unlearned": auc,
            "mia_intervals_loss_auc_unlearned_low": low,
            "mia_intervals_loss_auc_unlearned_high": high,
            "mia_vs_retrained_loss_auc_unlearned_within_noise": noise,
            "cost_client_epochs": epochs, "cost_server_seconds": seconds,
        })
    # a cell whose client never contributed: no figures, and not counted
    rows.append({"cell_id": "seed2-pga", "experiment": "pareto-test", "seed": 2,
                 "label": "pga", "method": "pga", "forget": "client-003", "status": "no-op"})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def table(tmp_path: Path) -> dict[str, Any]:
    # Prepare
    rows = bench.read_rows(_write_results(tmp_path / "results.csv"))
    # Execute
    summary = bench.summarise(rows, ["retrain", "subtract", "pga", "sifu"])
    return {row.label: row for row in summary}


def test_the_rows_are_the_reference_models_then_the_methods_in_order(tmp_path: Path) -> None:
    rows = bench.read_rows(_write_results(tmp_path / "results.csv"))
    summary = bench.summarise(rows, ["retrain", "subtract", "pga", "sifu"])
    assert [r.label for r in summary] == ["original", "retrained", "retrain", "subtract",
                                         "pga", "sifu"]
    assert [r.reference for r in summary] == [True, True, False, False, False, False]
    # the no-op cell of seed 2 counts nowhere
    assert {r.seeds for r in summary} == {2}


def test_accuracy_gap_is_to_the_retrained_model_of_the_same_seed(table: dict[str, Any]
                                                                  ) -> None:
    # original: 0.75 - 0.875 = -0.125 and 0.625 - 0.75 = -0.125
    assert table["original"].accuracy_gap.mean == pytest.approx(-0.125)
    assert table["original"].accuracy_gap.std == pytest.approx(0.0)
    assert table["retrained"].accuracy_gap.mean == 0.0
    assert table["retrain"].accuracy_gap.mean == 0.0
    # subtract: 0.75 - 0.875 = -0.125, 0.5 - 0.75 = -0.25; mean -0.1875, deviations
    # ±0.0625, sample variance 2 * 0.0625² / 1 = 0.0078125
    gap = table["subtract"].accuracy_gap
    assert (gap.mean, gap.n) == (pytest.approx(-0.1875), 2)
    assert gap.std == pytest.approx(math.sqrt(0.0078125))
    # pga: +0.0625 in both seeds
    assert table["pga"].accuracy_gap.mean == pytest.approx(0.0625)
    assert table["pga"].accuracy_gap.std == pytest.approx(0.0)


def test_costs_are_ratios_of_the_same_cells_retraining(table: dict[str, Any]) -> None:
    # pga: 128 / 640 = 0.2 and 192 / 640 = 0.3 -> mean 0.25, std sqrt(2 * 0.05²) = 0.0707
    ratio = table["pga"].client_epoch_ratio
    assert ratio.mean == pytest.approx(0.25)
    assert ratio.std == pytest.approx(math.sqrt(2 * 0.05**2))
    # wall: 2 / 8 = 0.25 and 2 / 4 = 0.5 -> mean 0.375, std sqrt(2 * 0.125²)
    assert table["pga"].wall_ratio.mean == pytest.approx(0.375)
    assert table["pga"].wall_ratio.std == pytest.approx(math.sqrt(2 * 0.125**2))
    # subtract: no client work; wall 0.08 / 8 = 0.01 and 0.02 / 4 = 0.005 -> mean 0.0075
    assert table["subtract"].client_epoch_ratio.mean == 0.0
    assert table["subtract"].wall_ratio.mean == pytest.approx(0.0075)
    assert table["subtract"].wall_ratio.std == pytest.approx(math.sqrt(2 * 0.0025**2))
    # retrain against its reference: 640 / 640, 8 / 8, 4 / 4
    assert (table["retrain"].client_epoch_ratio.mean, table["retrain"].wall_ratio.mean) == (
        1.0, 1.0)
    # the retrained model is the reference: 1 by definition; the original costs nothing
    assert table["retrained"].client_epoch_ratio.mean == 1.0
    assert table["original"].client_epoch_ratio.n == 0


def test_membership_figures_carry_the_averaged_bootstrap_bounds(table: dict[str, Any]
                                                                ) -> None:
    subtract = table["subtract"]
    # AUC 0.5 and 0.75: mean 0.625; bounds (0.375 + 0.625) / 2 = 0.5, (0.625 + 0.875) / 2
    assert subtract.mia_auc.mean == pytest.approx(0.625)
    assert subtract.mia_interval == (pytest.approx(0.5), pytest.approx(0.75))
    assert subtract.mia_within_noise == (1, 2)
    assert table["retrained"].mia_interval == (pytest.approx(0.25), pytest.approx(0.75))
    assert table["retrained"].mia_within_noise is None
    # the original model has no interval in these rows
    assert table["original"].mia_interval is None
    # backdoor of pga: 0 and 0.125 -> mean 0.0625; forgotten accuracy of subtract 0.75, 0.5
    assert table["pga"].backdoor.mean == pytest.approx(0.0625)
    assert table["subtract"].forgotten_accuracy.mean == pytest.approx(0.625)


def test_the_pareto_front_is_closeness_to_retraining_against_client_epochs(
        table: dict[str, Any]) -> None:
    # (|gap|, ratio): retrain (0, 1), subtract (0.1875, 0), pga (0.0625, 0.25),
    # sifu (0.0625, 1): sifu is dominated by pga (as close, cheaper); the rest are not
    front = {label for label, row in table.items() if row.pareto}
    assert front == {"retrain", "subtract", "pga"}
    assert bench.pareto_front([(1.0, 1.0), (1.0, 1.0)]) == {0, 1}  # ties dominate nothing
    assert bench.pareto_front([(math.nan, 0.0), (1.0, 1.0)]) == {1}


def test_the_printed_cells(table: dict[str, Any]) -> None:
    assert bench.table_cells(table["subtract"]) == [
        "subtract", "2",
        "-18.75 ± 8.84",           # points: -0.1875, std 0.0884
        "6.25",                    # backdoor %, no spread
        "62.50 ± 17.68",           # forgotten accuracy %: 0.625, std sqrt(2 * 0.125²)
        "0.625 ± 0.177 [0.500, 0.750]",
        "1/2",
        "0",                       # client-epochs / retrain
        "0.0075 ± 0.00354",        # wall / retrain
        "*",
    ]
    assert bench.table_cells(table["retrained"])[2] == "0.00"
    assert bench.table_cells(table["original"])[7:9] == ["—", "—"]
    assert bench.table_cells(table["sifu"])[-1] == ""
    lines = bench.markdown_table(list(table.values()))
    assert lines[0].startswith("| model | seeds | Δ test acc (pts) |")
    assert len(lines) == 2 + len(table)


def test_the_plot_has_one_panel_per_protocol(tmp_path: Path, table: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    rows = list(table.values())
    path = bench.write_plot({"a": rows, "b": rows}, tmp_path / "plot" / "pareto.png")
    assert path == tmp_path / "plot" / "pareto.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_and_class_methods_are_skipped_and_fukd_needs_a_proxy_set() -> None:
    methods, skipped = bench.whole_client_methods()
    assert methods[0] == "retrain"
    assert "fucp" not in methods
    assert skipped["fucp"] == "serves only class requests"
    kept, reasons = bench.protocol_methods({"proxy-fraction": 0.0}, ["retrain", "fukd"])
    assert kept == ["retrain"] and set(reasons) == {"fukd"}
    assert bench.protocol_methods({"proxy-fraction": 0.25}, ["retrain", "fukd"])[0] == [
        "retrain", "fukd"]


def test_the_noniid_protocol_is_the_sweeps_smallest_alpha_without_a_grid() -> None:
    noniid = next(p for p in bench.PROTOCOLS if p.name == "noniid")
    spec = bench.build_spec(noniid, ["retrain", "subtract"], seeds=[0, 1, 2], rounds=5)
    assert spec.grid == {}
    assert spec.base["dirichlet-alpha"] == 0.1
    assert spec.base["num-rounds"] == 5
    assert [c.cell_id for c in spec.cells()][:2] == ["seed0-retrain", "seed0-subtract"]
    assert len(spec.cells()) == 6

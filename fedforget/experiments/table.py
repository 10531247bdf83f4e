"""The results table of an experiment: one CSV row per cell, every scalar figure a column."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedforget.fileio import write_atomic

__all__ = ["RESULTS_CSV", "flatten_cell", "write_results_csv"]

RESULTS_CSV = "results.csv"

_SKIP = frozenset({"trace", "client_accuracy", "changes", "worst"})


def flatten_cell(record: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: identifiers, grid values, then every scalar figure of the result."""
    row: dict[str, Any] = {
        "cell_id": record["cell_id"],
        "experiment": record["experiment"],
        **{k: v for k, v in record["grid"].items()},
        "seed": record["seed"],
        "label": record["label"],
        "method": record["method"],
        "forget": " ".join(record["forget"]),
        "status": record["status"],
    }
    result = record.get("result")
    if result:
        row["exact"] = result.get("exact")
        row["bit_identical_to_retrained"] = result.get("reference", {}).get("bit_identical")
        row["model_digest"] = result.get("model_digest")
        _flatten(result.get("metrics", {}), "", row)
        _flatten(result.get("cost", {}), "cost_", row)
        _flatten(result.get("reference", {}).get("cost", {}), "retrain_cost_", row)
        # what computed it (fedforget.environment): models computed under other kernels
        # need not be equal bit for bit
        _flatten(result.get("environment") or {}, "env_", row)
    row.update(record.get("extra_metrics", {}))
    row["cell_seconds"] = record.get("cell_seconds")
    return row


def _flatten(obj: Mapping[str, Any], prefix: str, row: dict[str, Any]) -> None:
    for key, value in obj.items():
        if key in _SKIP:
            continue
        if isinstance(value, Mapping):
            _flatten(value, f"{prefix}{key}_", row)
        else:
            _put(row, f"{prefix}{key}", value)


def _put(row: dict[str, Any], key: str, value: Any) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        row[key] = value


def write_results_csv(out: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``results.csv`` (one row per record, in order) atomically; return its path."""
    rows = [flatten_cell(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_atomic(Path(out) / RESULTS_CSV, text.getvalue())

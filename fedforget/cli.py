"""The ``fedforget`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedforget.errors import FedForgetError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory to write (resumed if it exists)")
    p.add_argument(
        "--engine",
        choices=("inprocess", "simulation"),
        default="inprocess",
        help="in-process Grid (default) or Flower's simulation engine via `flwr run`",
    )
    p.add_argument("--app", default=None, help="Flower app project directory (default: found)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="fedforget", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the embedded default (digits, 10 clients)")
    _add_engine_args(demo)

    train = sub.add_parser("train", help="train the run described by a config file")
    train.add_argument("config", help="flat TOML of run-config keys, e.g. simulations/*.toml")
    _add_engine_args(train)

    history = sub.add_parser("history", help="inspect a run's history store")
    hsub = history.add_subparsers(dest="history_command", required=True)
    verify = hsub.add_parser("verify", help="check every record and blob against its digest")
    verify.add_argument("dir")
    show = hsub.add_parser("show", help="rounds, clients, retention, codec, bytes stored")
    show.add_argument("dir")
    show.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("demo", "train"):
            return _cmd_train(args)
        if args.command == "history" and args.history_command == "verify":
            return _cmd_verify(args)
        if args.command == "history" and args.history_command == "show":
            return _cmd_show(args)
    except FedForgetError as exc:
        print(f"fedforget: error: {exc}", file=sys.stderr)
        return 2
    return 2


# ------------------------------------------------------------------------ train
def _cmd_train(args: argparse.Namespace) -> int:
    from fedforget.config import load_config, parse_assignments
    from fedforget.engine import run_training
    from fedforget.engine.apps import find_project

    project = find_project(args.app)
    config_path = (
        project.root / "simulations" / "demo.toml" if args.command == "demo" else args.config
    )
    overrides: dict[str, Any] = parse_assignments(args.set)
    overrides["out-dir"] = str(Path(args.out).resolve())
    if args.quiet:
        overrides["progress"] = False
    cfg = load_config(config_path, **overrides)
    print(
        f"fedforget {args.command}: {cfg.dataset}, {cfg.num_clients} clients, "
        f"{cfg.num_rounds} rounds, model {cfg.model}, engine {args.engine} -> {cfg.out_dir}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    run_training(cfg, engine=args.engine, project=project)
    elapsed = time.perf_counter() - t0
    summary = _summary(cfg.out_dir)
    acc = _final_accuracy(Path(cfg.out_dir))
    print(f"rounds:              {summary['rounds']}")
    print(f"clients:             {len(summary['clients'])}")
    if acc is not None:
        print(f"final test accuracy: {acc:.4f}")
    print(f"final model digest:  {summary['final_model_digest']}")
    print(f"history:             {summary['bytes_stored']} bytes ({summary['codec']}, "
          f"updates kept every {summary['retain_interval']} rounds)")
    print(f"wall time:           {elapsed:.1f} s")
    print(f"run directory:       {cfg.out_dir}")
    return 0


def _final_accuracy(out: Path) -> float | None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(lines[-1]["test-accuracy"]) if lines else None


# ---------------------------------------------------------------------- history
def _summary(directory: str | Path) -> dict[str, Any]:
    from fedforget.history import HistoryStore

    with HistoryStore.open(directory) as store:
        return store.summary()


def _cmd_verify(args: argparse.Namespace) -> int:
    from fedforget.history.verify import verify_store

    report = verify_store(args.dir)
    if report.ok:
        print(
            f"OK: {report.rounds_checked} rounds and {report.blobs_checked} blobs match "
            f"their digests in {args.dir}"
        )
        return 0
    for problem in report.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print(f"history verify: {len(report.problems)} problem(s) in {args.dir}", file=sys.stderr)
    return 1


def _cmd_show(args: argparse.Namespace) -> int:
    summary = _summary(args.dir)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(f"run directory:      {args.dir}")
    print(f"rounds:             {summary['rounds']}")
    print(f"codec:              {summary['codec']}")
    print(f"retain interval:    {summary['retain_interval']} (client updates kept every "
          f"{summary['retain_interval']} rounds; global models every round)")
    print(f"bytes stored:       {summary['bytes_stored']}")
    print(f"final model digest: {summary['final_model_digest']}")
    print("clients (rounds of participation):")
    for cid, rounds in sorted(summary["clients"].items()):
        print(f"  {cid}: {_ranges(rounds)}")
    return 0


def _ranges(rounds: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


if __name__ == "__main__":
    raise SystemExit(main())

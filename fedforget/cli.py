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

    withdraw = sub.add_parser("withdraw", help="record that a client withdraws")
    withdraw.add_argument("dir", help="run directory")
    withdraw.add_argument("--client", required=True, help="stable client id, e.g. client-003")
    withdraw.add_argument("--reason", default="", help="the reason the client gave")

    unlearn = sub.add_parser("unlearn", help="remove a withdrawn client's influence")
    unlearn.add_argument("dir", help="run directory")
    unlearn.add_argument("--client", required=True, help="stable client id")
    unlearn.add_argument("--method", required=True, help="unlearning method (see --list)")
    unlearn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a method parameter (repeatable)")
    unlearn.add_argument("--reason", default="", help="reason, if the withdrawal is new")
    unlearn.add_argument("--json", action="store_true", help="print a JSON object")
    unlearn.add_argument("--quiet", action="store_true", help="no progress display")
    unlearn.add_argument("--app", default=None, help="Flower app project directory")
    unlearn.add_argument("--engine", choices=("inprocess", "simulation"), default="inprocess",
                         help="in-process Grid (default) or Flower's simulation engine")

    run = sub.add_parser(
        "run", help="run an experiment file: grids of methods x seeds x settings, a report"
    )
    run.add_argument("config", help="experiment TOML, e.g. simulations/quickstart.toml")
    run.add_argument("--out", required=True,
                     help="output directory (finished cells are skipped when it exists)")
    run.add_argument("--app", default=None, help="Flower app project directory")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    from fedforget.receipts.cli import add_subcommands

    add_subcommands(sub)  # keys generate, receipt verify

    history = sub.add_parser("history", help="inspect a run's history store")
    hsub = history.add_subparsers(dest="history_command", required=True)
    verify = hsub.add_parser(
        "verify", help="check the run directory read-only: records, blobs, WAL, ledger, "
        "signed tree heads, receipts, results")
    verify.add_argument("dir")
    verify.add_argument("--head", metavar="FILE",
                        help="a signed tree head (e.g. a client's head.json) to check against")
    verify.add_argument("--key", metavar="PUB",
                        help="the server's public key (default: DIR/keys/signing.pub)")
    show = hsub.add_parser("show", help="rounds, clients, retention, codec, bytes stored")
    show.add_argument("dir")
    show.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from fedforget.receipts.cli import dispatch

        code = dispatch(args)
        if code is not None:
            return code
        if args.command in ("demo", "train"):
            return _cmd_train(args)
        if args.command == "withdraw":
            return _cmd_withdraw(args)
        if args.command == "unlearn":
            return _cmd_unlearn(args)
        if args.command == "run":
            return _cmd_run(args)
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
    if args.command == "demo":
        _demo_unlearning(cfg, project, quiet=args.quiet)
    return 0


# FedEraser with the paper's defaults: Δt = 2 (every other stored round), r = 0.5.
DEMO_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("retrain", {}),
    ("rollback", {}),
    ("federaser", {"retain-interval": 2, "calibration-ratio": 0.5}),
    ("subtract", {}),
)


def _demo_unlearning(cfg: Any, project: Any, *, quiet: bool) -> None:
    """The demo's second half: the backdoor client withdraws and four methods unlearn it."""
    from fedforget.engine.unlearning import run_unlearning
    from fedforget.withdrawal import WithdrawalLedger

    leaving = sorted(cfg.backdoor_client_ids())
    if not leaving:
        return
    client = leaving[0]
    out = Path(cfg.out_dir)
    with WithdrawalLedger(out) as ledger:
        done = ledger.for_client(client)
    print(f"\n{client} planted a backdoor (trigger -> label {cfg.backdoor_target}) and now "
          f"withdraws{' (already recorded)' if done else ''}.")
    results = []
    for method, params in DEMO_METHODS:
        print(f"unlearning {client} with {method} ...", file=sys.stderr)
        info = run_unlearning(
            out, client=client, method=method, params=params,
            reason="demo: the backdoor client leaves",
            project=project, progress=not quiet,
        )
        if info is not None:
            results.append(info)
    print()
    print(format_table(results))
    print()
    print("Each unlearning issued a signed erasure receipt; verifying them as a user would:")
    for info in results:
        if not _verify_receipt_as_a_user(info, client):
            from fedforget.unlearning import UnlearningError

            raise UnlearningError(f"the receipt of {info['method']} did not verify")


def _verify_receipt_as_a_user(info: dict[str, Any], client: str) -> bool:
    """Run ``fedforget receipt verify`` in a subprocess on one result's receipt."""
    import shlex
    import subprocess

    receipt = info["receipt"]
    exe = Path(sys.executable).parent / "fedforget"
    prefix = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedforget.cli"]
    args = ["receipt", "verify", receipt["receipt_path"], "--key", receipt["public_key_path"],
            "--model", info["model_path"]]
    if receipt.get("head_path"):
        args += ["--head", receipt["head_path"]]
    salt = Path(receipt["salt_path"]).read_text().strip()
    args += ["--salt", salt, "--client", client]
    print("$ fedforget " + " ".join(shlex.quote(a) for a in args))
    done = subprocess.run(prefix + args, capture_output=True, text=True, check=False)
    print((done.stdout + done.stderr).strip())
    return done.returncode == 0


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per method: accuracy, forgotten accuracy, backdoor, distance, cost."""
    if not results:
        return "(no results)"
    header = (f"{'model':<11}{'exact':>6}{'test acc':>10}{'forgot acc':>11}{'backdoor':>10}"
              f"{'L2 to retrain':>15}{'client-ep':>11}{'speed-up ep':>12}{'wall s':>8}")
    first = results[0]["metrics"]
    backdoor = first.get("backdoor_success") or {}
    lines = [header, "-" * len(header)]
    lines.append(
        f"{'original':<11}{'':>6}{_pct(first['test_accuracy']['original']):>10}"
        f"{_pct((first['forgotten_accuracy'] or {}).get('original')):>11}"
        f"{_pct(backdoor.get('original')):>10}"
        f"{first['l2_to_retrained']['original']:>15.4f}{'':>11}{'':>12}{'':>8}"
    )
    for info in results:
        m = info["metrics"]
        bd = m.get("backdoor_success") or {}
        speed = m["speedup_client_epochs"]
        lines.append(
            f"{info['method']:<11}{'yes' if info['exact'] else 'no':>6}"
            f"{_pct(m['test_accuracy']['unlearned']):>10}"
            f"{_pct((m['forgotten_accuracy'] or {}).get('unlearned')):>11}"
            f"{_pct(bd.get('unlearned')):>10}"
            f"{m['l2_to_retrained']['unlearned']:>15.4f}"
            f"{info['cost']['client_epochs']:>11g}"
            f"{'inf' if speed is None else f'{speed:.2f}x':>12}"
            f"{info['cost']['server_seconds']:>8.2f}"
        )
    return "\n".join(lines)


def _final_accuracy(out: Path) -> float | None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(lines[-1]["test-accuracy"]) if lines else None


# -------------------------------------------------------------------------- run
def _cmd_run(args: argparse.Namespace) -> int:
    from fedforget.engine.apps import find_project
    from fedforget.experiments import load_experiment, run_experiment

    project = find_project(args.app)
    spec = load_experiment(args.config)
    t0 = time.perf_counter()
    records = run_experiment(spec, args.out, project=project, progress=not args.quiet)
    out = Path(args.out)
    print(f"experiment {spec.name}: {len(records)} cells in {time.perf_counter() - t0:.1f} s")
    print(f"results: {out / 'results.csv'}")
    print(f"report:  {out / 'report.md'}")
    return 0


# --------------------------------------------------------------------- withdraw
def _cmd_withdraw(args: argparse.Namespace) -> int:
    from fedforget.history import HistoryStore
    from fedforget.withdrawal import WithdrawalLedger

    with HistoryStore.open(args.dir) as store:
        roster = frozenset(store.roster())
        contributed = bool(store.clients().get(args.client))
    with WithdrawalLedger(args.dir) as ledger:
        request, created = ledger.request(args.client, reason=args.reason, roster=roster)
    verb = "recorded" if created else "already recorded"
    print(f"withdrawal {verb}: {request.request_id} for {request.client_id} "
          f"(state {request.state}, received {request.received_at})")
    if not contributed:
        print(f"{args.client} has no stored contribution: there is nothing to unlearn")
    return 0


# ---------------------------------------------------------------------- unlearn
def _cmd_unlearn(args: argparse.Namespace) -> int:
    from fedforget.config import parse_assignments
    from fedforget.engine.apps import find_project
    from fedforget.engine.unlearning import run_unlearning

    info = run_unlearning(
        args.dir, client=args.client, method=args.method, params=parse_assignments(args.set),
        reason=args.reason, engine=args.engine, project=find_project(args.app),
        progress=not (args.quiet or args.json),
    )
    if info is None:
        print(f"no-op: {args.client} has no stored contribution in {args.dir}; "
              "the model is unchanged and nothing was written")
        return 0
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(format_comparison(info))
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:6.2f}%"


def format_comparison(info: dict[str, Any]) -> str:
    """A readable summary of one unlearning result."""
    m = info["metrics"]
    cost = info["cost"]
    ref = info["reference"]
    lines = [
        f"method {info['method']} (v{info['method_version']}, "
        f"{'exact' if info['exact'] else 'approximate'}) forgot {', '.join(info['forgotten'])}",
        f"{'':24}{'original':>10}{'unlearned':>11}{'retrained':>11}",
    ]
    rows = [("test accuracy", m["test_accuracy"]),
            ("forgotten-data accuracy", m["forgotten_accuracy"])]
    if m.get("backdoor_success"):
        rows.append(("backdoor success", m["backdoor_success"]))
    for label, values in rows:
        if values:
            lines.append(f"{label:24}{_pct(values.get('original')):>10}"
                         f"{_pct(values.get('unlearned')):>11}{_pct(values.get('retrained')):>11}")

    def fraction(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    shadow = m.get("shadow_attack") or {}
    attacks = [("MIA AUC, loss", m.get("mia_loss_auc")),
               ("MIA AUC, confidence", m.get("mia_confidence_auc"))]
    if shadow:
        attacks += [(f"shadow MIA {part}", {name: shadow[name][part] for name in shadow})
                    for part in ("precision", "recall", "auc")]
    for label, values in attacks:
        if values:
            lines.append(f"{label:24}{fraction(values.get('original')):>10}"
                         f"{fraction(values.get('unlearned')):>11}"
                         f"{fraction(values.get('retrained')):>11}")
    lines.append(f"L2 distance to retrained: original {m['l2_to_retrained']['original']:.4f}, "
                 f"unlearned {m['l2_to_retrained']['unlearned']:.4f}"
                 + ("  (bit-identical)" if ref["bit_identical"] else ""))
    if m.get("kl_to_retrained") and m.get("js_to_retrained"):
        kl, js = m["kl_to_retrained"], m["js_to_retrained"]
        lines.append(f"prediction divergence to retrained (nats): KL original "
                     f"{kl['original']:.4f}, unlearned {kl['unlearned']:.4f}; JS original "
                     f"{js['original']:.4f}, unlearned {js['unlearned']:.4f}")
    impact = m.get("client_impact")
    if impact:
        worst = ", ".join(f"{w['client']} {100 * w['change']:+.2f}" for w in impact["worst"])
        lines.append(f"remaining clients' held-out accuracy change (points): mean "
                     f"{100 * impact['mean']:+.2f}, worst {worst}")
    speed_wall = m["speedup_wall"]
    speed_epochs = m["speedup_client_epochs"]
    lines.append(
        f"cost: {cost['client_epochs']:g} client-epochs, {cost['rounds']} rounds, "
        f"{cost['server_seconds']:.2f} s (retrain: {ref['cost']['client_epochs']:g} "
        f"client-epochs, {ref['cost']['server_seconds']:.2f} s); speed-up "
        f"{'∞' if speed_epochs is None else f'{speed_epochs:.2f}×'} in client-epochs, "
        f"{'-' if speed_wall is None else f'{speed_wall:.2f}×'} in wall time"
    )
    for note in info.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"model: {info['model_path']} ({info['model_digest']})")
    lines.append(f"receipt: {info['receipt_path']} (public key {info['public_key_path']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- history
def _summary(directory: str | Path) -> dict[str, Any]:
    from fedforget.history import HistoryStore

    with HistoryStore.open(directory) as store:
        return store.summary()


def _cmd_verify(args: argparse.Namespace) -> int:
    from fedforget.history.verify import verify_store

    report = verify_store(args.dir, head=args.head, public_key=args.key)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.ok:
        print(
            f"OK: {report.rounds_checked} rounds and {report.blobs_checked} blobs match "
            f"their digests in {args.dir}; {report.heads_checked} signed tree heads, "
            f"{report.receipts_checked} receipts and {report.results_checked} results agree "
            "with the store"
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

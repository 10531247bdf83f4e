"""The ``fedforget`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedforget.errors import ConfigError, FedForgetError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory to write (resumed if it exists)")
    p.add_argument(
        "--engine",
        choices=("inprocess", "simulation", "deployment"),
        default="inprocess",
        help="in-process Grid (default), Flower's simulation engine via `flwr run`, or a "
             "running SuperLink with SuperNodes (deployment; see --connection)",
    )
    _add_connection_args(p)
    p.add_argument("--app", default=None, help="Flower app project directory (default: found)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected an integer >= 0")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value
def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connection", default=None, metavar="NAME|HOST:PORT",
                   help="deployment: a connection of $FLWR_HOME/config.toml, or the "
                        "SuperLink's address (with --root-certificates)")
    p.add_argument("--root-certificates", default=None, metavar="PEM",
                   help="deployment: the CA certificate of the SuperLink's TLS, with an "
                        "address as --connection")
    p.add_argument("--node-auth", action="store_true",
                   help="deployment: the SuperLink authenticates SuperNodes "
                        "(--enable-supernode-auth), so each client id is pinned to the "
                        "first node that claims it")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="fedforget", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the embedded default (digits, 10 clients)")
    _add_engine_args(demo)

    train = sub.add_parser("train", help="train (or resume) a run of fedforget's app or yours")
    train.add_argument("config", nargs="?", default=None,
                       help="flat TOML of run-config keys, e.g. simulations/*.toml (for your "
                            "own app: optional, over its pyproject defaults)")
    _add_engine_args(train)
    train.add_argument("--withdrawal-method", default="", metavar="NAME",
                       help="the server's policy for withdrawals the clients ask for "
                            "themselves (`fedforget client withdraw` on a node): the method "
                            "that serves them after the rounds (default: record them only)")
    train.add_argument("--withdrawal-params", default="", metavar="JSON",
                       help="that method's parameters, a JSON object")
    train.add_argument("--clients", type=int, default=None, metavar="N",
                       help="number of clients (SuperNodes) for an app other than fedforget's "
                            "(default: its pyproject's local-simulation num-supernodes)")

    withdraw = sub.add_parser("withdraw", help="record that a client withdraws")
    withdraw.add_argument("dir", help="run directory")
    withdraw.add_argument("--client", required=True, help="stable client id, e.g. client-003")
    withdraw.add_argument("--reason", default="", help="the reason the client gave")
    withdraw.add_argument("--keys", default=None, metavar="DIR",
                          help="the server's signing keys (default: DIR/keys)")

    unlearn = sub.add_parser("unlearn", help="remove a withdrawn client's influence (or some "
                             "of its records, or a class)")
    unlearn.add_argument("dir", help="run directory")
    unlearn.add_argument("--client", default=None,
                         help="stable client id (with --forget-class: who asks, default "
                              "'operator')")
    size = unlearn.add_mutually_exclusive_group()
    size.add_argument("--records", default=None, metavar="FILE",
                      help="forget only these records of the client (a file of record ids, "
                           "one per line); the client stays")
    size.add_argument("--forget-class", default=None, metavar="LABELS",
                      help="forget every example of these labels (e.g. 3 or 3,5) on every "
                           "client")
    unlearn.add_argument("--method", required=True, help="unlearning method (see --list)")
    unlearn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a method parameter (repeatable)")
    unlearn.add_argument("--reason", default="", help="reason, if the withdrawal is new")
    unlearn.add_argument("--json", action="store_true", help="print a JSON object")
    unlearn.add_argument("--quiet", action="store_true", help="no progress display")
    unlearn.add_argument("--app", default=None, help="Flower app project directory")
    unlearn.add_argument("--engine", choices=("inprocess", "simulation", "deployment"),
                         default="inprocess",
                         help="in-process Grid (default), Flower's simulation engine, or the "
                              "SuperLink the run was trained on (see --connection)")
    _add_connection_args(unlearn)
    unlearn.add_argument("--reference", choices=("compute", "cached", "none"),
                         default="compute",
                         help="compute (default, cached per forget set), reuse a cached, or "
                              "skip the retrained reference")
    unlearn.add_argument("--keys", default=None, metavar="DIR",
                         help="the server's signing keys (default: DIR/keys)")
    unlearn.add_argument("--impact-clients", type=_non_negative, default=None, metavar="N",
                         help="remaining clients (a sample seeded by the run seed) asked for "
                              "the per-client impact (default 100; 0: every one)")
    unlearn.add_argument("--shadow-attack", choices=("auto", "on", "off"), default="auto",
                         help="the shadow-model membership attack (auto, the default: unless "
                              "--reference none)")

    client = sub.add_parser("client", help="a client's own side (run on the client's node)")
    csub = client.add_subparsers(dest="client_command", required=True)
    ask = csub.add_parser("withdraw", help="ask the server to forget this client; the request "
                                           "goes with the node's next reply")
    ask.add_argument("--state-dir", required=True, help="the client's state directory "
                     "(its node config state-dir; in simulation <run>/client-state/<id>)")
    ask.add_argument("--reason", default="", help="the reason, for the receipt")
    status = csub.add_parser("status", help="this client's withdrawal and receipts")
    status.add_argument("--state-dir", required=True)

    run = sub.add_parser(
        "run", help="run an experiment file: grids of methods x seeds x settings, a report"
    )
    run.add_argument("config", help="experiment TOML, e.g. simulations/quickstart.toml")
    run.add_argument("--out", required=True,
                     help="output directory (finished cells are skipped when it exists)")
    run.add_argument("--app", default=None, help="Flower app project directory")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--workers", type=_positive, default=1, metavar="N",
                     help="train and unlearn independent training runs in N processes "
                          "(results identical to a serial run)")
    run.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run the training runs as tasks of an existing Ray cluster (every "
                          "node must see --out at the same path)")

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
        if args.command == "client":
            return _cmd_client(args)
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
    from fedforget.config import RunConfig, load_config, parse_assignments, read_toml
    from fedforget.engine import run_app, run_training
    from fedforget.engine.apps import find_project
    from fedforget.settings import RunSettings

    project = find_project(args.app)
    out = Path(args.out).resolve()
    connection = _connection(args)
    overrides: dict[str, Any] = parse_assignments(args.set)
    own_app = project.app_keys() == frozenset(RunConfig.keys())
    t0 = time.perf_counter()
    if own_app:
        config_path = (project.root / "simulations" / "demo.toml" if args.command == "demo"
                       or args.config is None else args.config)
        cfg = load_config(config_path, **overrides)
        print(f"fedforget {args.command}: {cfg.dataset}, {cfg.num_clients} clients, "
              f"{cfg.num_rounds} rounds, model {cfg.model}, engine {args.engine} -> {out}",
              file=sys.stderr)
        run_training(cfg, out=out, engine=args.engine, project=project,
                     progress=not args.quiet, connection=connection, node_auth=args.node_auth,
                     **_withdrawal_policy(args))
    else:
        if args.command == "demo":
            raise ConfigError(f"`fedforget demo` runs fedforget's own app; {project.root} "
                              "holds another (use `fedforget train --app ...`)")
        from fedforget.settings import app_run_config

        values = app_run_config(project.run_config_defaults())
        if args.config is not None:
            values.update(read_toml(args.config))
        values.update(overrides)
        clients = args.clients or _num_supernodes(project.root)
        print(f"fedforget train: app {project.root.name}, {clients} clients, engine "
              f"{args.engine} -> {out}", file=sys.stderr)
        settings = RunSettings(out_dir=str(out), progress=not args.quiet, engine=args.engine,
                               node_auth=args.node_auth, **_withdrawal_policy(args))
        run_app(project, run_config={**values, **settings.to_run_config()}, num_nodes=clients,
                engine=args.engine, progress=not args.quiet, connection=connection)
    elapsed = time.perf_counter() - t0
    summary = _summary(out)
    acc = _final_accuracy(out)
    print(f"rounds:              {summary['rounds']}")
    print(f"clients:             {len(summary['clients'])}")
    if acc is not None:
        print(f"final test accuracy: {acc:.4f}")
    print(f"final model digest:  {summary['final_model_digest']}")
    print(f"history:             {summary['bytes_stored']} bytes ({summary['codec']}, "
          f"updates kept every {summary['retain_interval']} rounds)")
    print(f"wall time:           {elapsed:.1f} s")
    print(f"run directory:       {out}")
    if args.command == "demo":
        _demo_unlearning(cfg, out, project, quiet=args.quiet)
    return 0


def _connection(args: argparse.Namespace) -> Any:
    """The SuperLink of ``--engine deployment`` (None for the other engines)."""
    if args.engine != "deployment":
        if args.connection or args.root_certificates or args.node_auth:
            raise ConfigError(f"--connection/--root-certificates/--node-auth are for --engine "
                              f"deployment (the engine is {args.engine!r})")
        return None
    if args.command == "demo":
        raise ConfigError("`fedforget demo --engine deployment`: the demo unlearns in this "
                          "process, which a deployed run's clients are not; use `fedforget "
                          "train --engine deployment`")
    if not args.connection:
        raise ConfigError("--engine deployment needs --connection NAME (of "
                          "$FLWR_HOME/config.toml) or --connection HOST:PORT with "
                          "--root-certificates PEM")
    from fedforget.engine.deployment import SuperLinkTarget

    return SuperLinkTarget.from_cli(args.connection, args.root_certificates)


def _withdrawal_policy(args: argparse.Namespace) -> dict[str, Any]:
    """``--withdrawal-method``/``--withdrawal-params`` as RunSettings (train only)."""
    method = getattr(args, "withdrawal_method", "") or ""
    params = getattr(args, "withdrawal_params", "") or ""
    if params and not method:
        raise ConfigError("--withdrawal-params without --withdrawal-method: give the method")
    if method:
        from fedforget.settings import RunSettings
        from fedforget.unlearning import get_method

        policy = RunSettings(withdrawal_method=method,
                             withdrawal_params=params).withdrawal_policy()
        assert policy is not None
        get_method(*policy)  # refuse bad input before anything runs
    return {"withdrawal_method": method, "withdrawal_params": params}


def _num_supernodes(root: Path) -> int:
    """``num-supernodes`` of the app's default local-simulation federation, if it says."""
    from fedforget.config import read_toml

    flwr = read_toml(root / "pyproject.toml").get("tool", {}).get("flwr", {})
    federations = flwr.get("federations", {})
    default = federations.get("default")
    options = federations.get(default, {}).get("options", {}) if default else {}
    n = options.get("num-supernodes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"how many clients? give --clients N ({root}/pyproject.toml names no "
                          "num-supernodes for its default federation)")
    return n


# FedEraser with the paper's defaults: Δt = 2 (every other stored round), r = 0.5.
DEMO_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("retrain", {}),
    ("rollback", {}),
    ("federaser", {"retain-interval": 2, "calibration-ratio": 0.5}),
    ("subtract", {}),
)


def _demo_unlearning(cfg: Any, out: Path, project: Any, *, quiet: bool) -> None:
    """The demo's second half: the backdoor client withdraws and four methods unlearn it."""
    from fedforget.engine import run_unlearning
    from fedforget.withdrawal import WithdrawalLedger

    leaving = sorted(cfg.backdoor_client_ids())
    if not leaving:
        return
    client = leaving[0]
    with WithdrawalLedger(out) as ledger:
        done = ledger.for_client(client)
    print(f"\n{client} planted a backdoor (trigger -> label {cfg.backdoor_target}) and now "
          f"withdraws{' (already recorded)' if done else ''}.")
    results = []
    for method, params in DEMO_METHODS:
        print(f"unlearning {client} with {method} ...", file=sys.stderr)
        outcome = run_unlearning(
            out, client=client, method=method, params=params,
            reason="demo: the backdoor client leaves", project=project, progress=not quiet,
        )
        if outcome is not None:
            results.append(outcome)
    print()
    print(format_table(results))
    print()
    print("Each unlearning issued a signed erasure receipt; verifying them as a user would:")
    for outcome in results:
        if not _verify_receipt_as_a_user(out, outcome):
            from fedforget.unlearning import UnlearningError

            raise UnlearningError(f"the receipt of {outcome.method} did not verify")


def _verify_receipt_as_a_user(out: Path, outcome: Any) -> bool:
    """Run ``fedforget receipt verify`` in a subprocess on one result's receipt."""
    import shlex
    import subprocess

    receipt = outcome.receipt
    exe = Path(sys.executable).parent / "fedforget"
    prefix = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedforget.cli"]
    args = ["receipt", "verify", str(out / receipt.receipt_path), "--key",
            receipt.public_key_path, "--model", str(out / outcome.model_path)]
    if receipt.head_path:
        args += ["--head", receipt.head_path]
    from fedforget.rundir import RunDirectory

    # The salt, as the client keeps it once delivered (else the server's copy, still waiting)
    kept = RunDirectory(out).client_state(outcome.client_id) / "receipts" / (
        f"{receipt.receipt_id}.salt")
    salt = (kept if kept.exists() else out / receipt.salt_outbox).read_text().strip()
    args += ["--salt", salt, "--client", outcome.client_id]
    print("$ fedforget " + " ".join(shlex.quote(a) for a in args))
    done = subprocess.run(prefix + args, capture_output=True, text=True, check=False)
    print((done.stdout + done.stderr).strip())
    return done.returncode == 0


def _figure(metrics: dict[str, Any], name: str, model: str) -> float | None:
    values = metrics.get(name)
    return values.get(model) if isinstance(values, dict) else None


def format_table(results: list[Any]) -> str:
    """One line per method: accuracy, forgotten accuracy, backdoor, distance, cost."""
    if not results:
        return "(no results)"
    header = (f"{'model':<11}{'exact':>6}{'test acc':>10}{'forgot acc':>11}{'backdoor':>10}"
              f"{'L2 to retrain':>15}{'client-ep':>11}{'speed-up ep':>12}{'wall s':>8}")
    first = results[0].metrics
    lines = [header, "-" * len(header)]
    lines.append(
        f"{'original':<11}{'':>6}{_pct(_figure(first, 'test_accuracy', 'original')):>10}"
        f"{_pct(_figure(first, 'forgotten_accuracy', 'original')):>11}"
        f"{_pct(_figure(first, 'backdoor_success', 'original')):>10}"
        f"{_num(_figure(first, 'l2_to_retrained', 'original')):>15}{'':>11}{'':>12}{'':>8}"
    )
    for outcome in results:
        m = outcome.metrics
        speed = m.get("speedup_client_epochs")
        lines.append(
            f"{outcome.method:<11}{'yes' if outcome.exact else 'no':>6}"
            f"{_pct(_figure(m, 'test_accuracy', 'unlearned')):>10}"
            f"{_pct(_figure(m, 'forgotten_accuracy', 'unlearned')):>11}"
            f"{_pct(_figure(m, 'backdoor_success', 'unlearned')):>10}"
            f"{_num(_figure(m, 'l2_to_retrained', 'unlearned')):>15}"
            f"{outcome.cost.client_epochs:>11g}"
            f"{'inf' if speed is None else f'{speed:.2f}x':>12}"
            f"{outcome.cost.server_seconds:>8.2f}"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _final_accuracy(out: Path) -> float | None:
    from fedforget.rundir import RunDirectory

    path = RunDirectory(out).metrics
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    value = lines[-1].get("accuracy") if lines else None
    return float(value) if isinstance(value, int | float) else None


# -------------------------------------------------------------------------- run
def _cmd_run(args: argparse.Namespace) -> int:
    from fedforget.engine.apps import find_project
    from fedforget.experiments import load_experiment, run_experiment

    project = find_project(args.app)
    spec = load_experiment(args.config)
    t0 = time.perf_counter()
    records = run_experiment(spec, args.out, project=project, progress=not args.quiet,
                             workers=args.workers, ray_address=args.ray)
    out = Path(args.out)
    print(f"experiment {spec.name}: {len(records)} cells in {time.perf_counter() - t0:.1f} s")
    print(f"results: {out / 'results.csv'}")
    print(f"report:  {out / 'report.md'}")
    return 0


# --------------------------------------------------------------------- withdraw
def _cmd_withdraw(args: argparse.Namespace) -> int:
    from fedforget.history import HistoryStore
    from fedforget.receipts.issuer import head_log
    from fedforget.rundir import RunDirectory
    from fedforget.withdrawal import WithdrawalLedger

    with HistoryStore.open(args.dir) as store:
        roster = frozenset(store.roster())
        contributed = bool(store.client_rounds(args.client))
        with WithdrawalLedger(args.dir) as ledger:
            request, created = ledger.request(args.client, reason=args.reason, roster=roster)
        if created:  # the ledger change is covered by a signed head
            head_log(store, RunDirectory(args.dir), Path(args.keys) if args.keys else None)
    verb = "recorded" if created else "already recorded"
    print(f"withdrawal {verb}: {request.request_id} for {request.client_id} "
          f"(state {request.state}, received {request.received_at})")
    if not contributed:
        print(f"{args.client} has no stored contribution: there is nothing to unlearn")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from fedforget.clients.mod import ask_withdrawal, withdrawal_status

    state = Path(args.state_dir)
    if args.client_command == "withdraw":
        before = withdrawal_status(state)
        ask = ask_withdrawal(state, reason=args.reason)
        print(f"withdrawal {'already ' if before else ''}asked at {ask['asked_at']} "
              f"({ask['state']}): it reaches the server with this node's next reply")
        return 0
    ask = withdrawal_status(state)
    if ask is None:
        print(f"no withdrawal asked in {state}")
        return 0
    print(f"withdrawal {ask['state']}: asked at {ask['asked_at']}, reason {ask['reason']!r}")
    if ask.get("receipt_id"):
        receipt = state / "receipts" / f"{ask['receipt_id']}.json"
        salt = receipt.with_suffix(".salt")
        print(f"receipt: {receipt}\nsalt:    {salt}\nserver public key: {state / 'server.pub'}")
        print(f"verify:  fedforget receipt verify {receipt} --key {state / 'server.pub'} "
              f"--head {state / 'head.json'} --salt $(cat {salt}) --client <your id>")
    return 0


# ---------------------------------------------------------------------- unlearn
def _cmd_unlearn(args: argparse.Namespace) -> int:
    from fedforget.config import parse_assignments
    from fedforget.engine import run_unlearning
    from fedforget.erasure import ErasureError, read_record_file

    records = read_record_file(args.records) if args.records else None
    labels = None
    if args.forget_class is not None:
        parts = [p.strip() for p in args.forget_class.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise ErasureError(f"--forget-class {args.forget_class!r}: expected labels such "
                               "as 3 or 3,5")
        labels = [int(p) for p in parts]
    client = args.client or ("operator" if labels is not None else None)
    if client is None:
        raise ConfigError("--client is required (unless --forget-class names the labels)")
    # With --json, stdout carries the JSON object only: what the app prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        outcome = run_unlearning(
            args.dir, client=client, method=args.method,
            params=parse_assignments(args.set), reason=args.reason, engine=args.engine,
            app_dir=args.app, progress=not (args.quiet or args.json),
            reference=args.reference, keys_dir=args.keys, records=records, labels=labels,
            connection=_connection(args), node_auth=args.node_auth,
            shadow_attack=args.shadow_attack,
            **({} if args.impact_clients is None else {"impact_clients": args.impact_clients}),
        )
    if outcome is None:
        print(f"no-op: {client} has no stored contribution in {args.dir}; "
              "the model is unchanged and nothing was written")
        return 0
    run = Path(args.dir).resolve()
    if args.json:
        info = outcome.to_dict()
        info["model_path"] = str(run / outcome.model_path)
        info["result_path"] = str(run / Path(outcome.model_path).parent / "result.json")
        if outcome.receipt is not None:
            info["receipt_path"] = str(run / outcome.receipt.receipt_path)
            info["public_key_path"] = outcome.receipt.public_key_path
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(format_comparison(outcome, run))
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:6.2f}%"


def format_comparison(outcome: Any, run: Path) -> str:
    """A readable summary of one unlearning result."""
    m = outcome.metrics
    cost = outcome.cost
    ref = outcome.reference
    scope = outcome.scope or {}
    forgot = ", ".join(outcome.forgotten) or "no whole client"
    if outcome.kind == "records":
        forgot = f"{scope.get('records', {}).get(outcome.client_id, '?')} records of " \
                 f"{outcome.client_id}" + (f" (and {forgot})" if outcome.forgotten else "")
    elif outcome.kind == "class":
        forgot = f"class {', '.join(map(str, scope.get('labels', [])))} on every client"
    lines = [
        f"method {outcome.method} (v{outcome.method_version}, "
        f"{'exact' if outcome.exact else 'approximate'}) forgot {forgot}"
        f" on engine {outcome.engine}",
        f"{'':24}{'original':>10}{'unlearned':>11}{'retrained':>11}",
    ]
    rows = [("test accuracy", m.get("test_accuracy")),
            ("forgotten-data accuracy", m.get("forgotten_accuracy"))]
    if m.get("forgotten_class_accuracy"):
        rows += [("forgotten-class test acc", m["forgotten_class_accuracy"]),
                 ("other classes test acc", m.get("retained_class_accuracy"))]
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
    l2 = m.get("l2_to_retrained")
    if l2:
        lines.append(f"L2 distance to retrained: original {l2['original']:.4f}, "
                     f"unlearned {l2['unlearned']:.4f}"
                     + ("  (bit-identical)" if ref.bit_identical else ""))
    else:
        lines.append(f"no retrained reference ({ref.status}): no comparison with retraining")
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
    speed_wall = m.get("speedup_wall")
    speed_epochs = m.get("speedup_client_epochs")
    retrain = (f" (retrain: {ref.cost.client_epochs:g} client-epochs, "
               f"{ref.cost.server_seconds:.2f} s)" if ref.cost is not None else "")
    lines.append(
        f"cost: {cost.client_epochs:g} client-epochs, {cost.rounds} rounds, "
        f"{cost.server_seconds:.2f} s{retrain}; speed-up "
        f"{'-' if speed_epochs is None else f'{speed_epochs:.2f}×'} in client-epochs, "
        f"{'-' if speed_wall is None else f'{speed_wall:.2f}×'} in wall time"
    )
    for note in outcome.notes:
        lines.append(f"note: {note}")
    lines.append(f"model: {run / outcome.model_path} ({outcome.model_digest})")
    if outcome.receipt is not None:
        lines.append(f"receipt: {run / outcome.receipt.receipt_path} "
                     f"(public key {outcome.receipt.public_key_path})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- history
def _summary(directory: str | Path) -> dict[str, Any]:
    from fedforget.history import HistoryStore

    with HistoryStore.open(directory, read_only=True) as store:
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

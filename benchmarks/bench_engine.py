"""The in-process engine vs a plain PyTorch FedAvg loop doing the same training.

Both sides train the demo configuration of issue 2 (``_common.BENCH_CONFIG``: digits,
10 clients, Dirichlet(0.5), MLP, 2 local epochs, batch 16, lr 0.1) for the same number of
rounds, from
the same initial model (:func:`fedforget.task.new_model`), on the same partitions
(:func:`fedforget.task.load_client_data`), with the same clients per round
(:class:`fedforget.sampling.ClientSampler`), the same per-client seeds
(:func:`fedforget.sampling.client_train_seed`) and the same
:func:`fedforget.training.train_local`. The plain loop averages the clients' state dicts
weighted by example count, in client-id order, and evaluates on the same schedule as the
ServerApp (test set after every round, clients' held-out splits after the last round), so
the two do the same work apart from what the engine adds: Flower messages and records,
reply validation, history recording.

Variants, run interleaved (rotating order) after a warm-up:

* ``plain loop``: the baseline;
* ``engine``: ``fedforget.engine.run_training(cfg, out=..., engine="inprocess")``, history
  store on
  (fsync on, as ``fedforget train`` runs);
* ``engine, no store writes``: the same with ``HistoryStore.commit_round`` replaced by a
  no-op and no tree heads signed over the rounds (BENCHMARK-LOCAL PATCH, see
  ``_common.no_store_writes``);
* ``what-if engine`` (with and without store writes): the engine with Flower's own
  ``Array`` conversions made fast in every caller (BENCHMARK-LOCAL PATCH,
  ``_common.what_if_fast_records``): decoded with ``np.frombuffer`` instead of ``np.load``,
  encoded with a cached ``.npy`` header instead of ``np.save`` (same bytes). Since commit
  b78c5fd fedforget's own conversions do this, so on such code the what-if only adds
  Flower's FedAvg decoding every reply. Left out with ``--no-what-if``.

The script checks that every variant ends with the same final model and prints the largest
absolute difference. Goal (issue 2): engine / plain <= 1.2.

A last section measures the engine's fixed cost alone: the plain loop and the two engine
variants again with ``train_local`` replaced by a function that trains nothing and reports
the client's example count (BENCHMARK-LOCAL PATCH, ``_common.stubbed_training``), so that what
is left per round is everything but local training. From it follows the local training a
round would need for the goal to hold, were the fixed cost all the engine added (a lower
bound: beside real training the same code costs more, mostly through the waits it causes
the training thread, see ``bench_sleeps.py``).

``--set key=value`` overrides the demo configuration (e.g. ``--set local-epochs=6``).

Usage: ``python benchmarks/bench_engine.py [--quick] [--rounds R] [--repetitions N]
[--no-what-if] [--set key=value ...]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    demo_config,
    describe,
    environment,
    interleave,
    no_store_writes,
    project,
    scratch_dir,
    stubbed_training,
    timed_calls,
    train,
    what_if_fast_records,
)

from fedforget.config import parse_assignments
from fedforget.history import HistoryStore
from fedforget.sampling import ClientSampler, client_train_seed
from fedforget.task import load_client_data, load_test_set, new_model
from fedforget.tensors import tensors_digest
from fedforget.training import evaluate, train_local

GOAL = 1.2
WHAT_IF = "what-if engine"


def plain_fedavg(cfg: Any) -> dict[str, np.ndarray]:
    """FedAvg in plain PyTorch; returns the final global model as numpy arrays."""
    client_ids = [f"client-{i:03d}" for i in range(cfg.num_clients)]
    data = {cid: load_client_data(cfg, i) for i, cid in enumerate(client_ids)}
    test_set = load_test_set(cfg)
    sampler = ClientSampler(seed=cfg.seed, count=cfg.clients_per_round())
    global_model = new_model(cfg)
    local_model = new_model(cfg)
    global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    for t in range(1, cfg.num_rounds + 1):
        replies: list[tuple[int, dict[str, torch.Tensor]]] = []
        for cid in sampler.sample(t, client_ids):  # sorted client ids
            local_model.load_state_dict(global_state)
            result = train_local(
                local_model,
                data[cid][0],
                epochs=cfg.local_epochs,
                learning_rate=cfg.learning_rate,
                batch_size=cfg.batch_size,
                seed=client_train_seed(cfg.seed, t, cid),
            )
            state = {k: v.detach().clone() for k, v in local_model.state_dict().items()}
            replies.append((result.num_examples, state))
        total = sum(n for n, _ in replies)
        average: dict[str, torch.Tensor] = {}
        for n, state in replies:
            weight = n / total
            for key, value in state.items():
                if key in average:
                    average[key] += value * weight
                else:
                    average[key] = value * weight
        global_state = average
        global_model.load_state_dict(global_state)
        evaluate(global_model, test_set)
    for cid in client_ids:  # federated evaluation on the held-out splits after the last round
        evaluate(global_model, data[cid][1])
    return {k: v.numpy().copy() for k, v in global_state.items()}


def max_abs_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference over all tensors (the key sets must agree)."""
    if list(a) != list(b):
        raise ValueError(f"different tensors: {list(a)} vs {list(b)}")
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def breakdown(proj: Any, new_run: Any, *, rounds: int, repetitions: int) -> str:
    """Where the time of one engine run goes (store writes off), in ms per round.

    Each engine phase is timed by a wrapper (BENCHMARK-LOCAL PATCH, ``_common.timed_calls``);
    the plain loop is timed the same way around ``train_local`` and ``evaluate``. Medians
    over ``repetitions`` runs of each, interleaved.
    """
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg

    proj.load()
    import fedforget.strategies.history as history_module

    client_app = sys.modules["clients.app"]  # the project's apps, loaded from its root
    server_app = sys.modules["server.app"]
    recording = history_module.HistoryRecording
    engine_targets = [
        (ClientApp, "__call__", "client"),
        (client_app, "train_local", "train"),
        (client_app, "new_model", "new_model"),
        (client_app, "evaluate", "client_eval"),
        (recording, "configure_train", "configure"),
        (recording, "aggregate_train", "aggregate"),
        (recording, "_check_reply", "check"),  # older name
        (history_module, "check_train_reply", "check"),
        (FedAvg, "aggregate_train", "fedavg"),
        (server_app, "evaluate", "server_eval"),
    ]
    this = sys.modules[__name__]
    plain_targets = [(this, "train_local", "train"), (this, "evaluate", "eval")]
    engine_rows: list[dict[str, float]] = []
    plain_rows: list[dict[str, float]] = []
    for _ in range(repetitions):
        with no_store_writes(), timed_calls(engine_targets) as t:
            start = time.perf_counter()
            train(*new_run(), project=proj)
            wall = time.perf_counter() - start
        engine_rows.append(
            {
                "local training (train_local)": t["train"],
                "evaluation (test set each round, hold-outs at the end)": t["server_eval"]
                + t["client_eval"],
                "ClientApp: new_model calls": t["new_model"],
                "ClientApp: rest (records <-> tensors, Flower dispatch)": t["client"]
                - t["train"] - t["new_model"] - t["client_eval"],
                "server: reply validation (check_train_reply)": t["check"],
                "server: FedAvg.aggregate_train (Flower)": t["fedavg"],
                "server: rest of aggregate_train (updates, digest)": t["aggregate"]
                - t["check"] - t["fedavg"],
                "server: configure_train": t["configure"],
                "everything else (Flower loop, messages, identify, store)": wall
                - t["client"] - t["aggregate"] - t["configure"] - t["server_eval"],
                "total": wall,
            }
        )
        with timed_calls(plain_targets) as t:
            start = time.perf_counter()
            plain_fedavg(new_run()[0])
            wall = time.perf_counter() - start
        plain_rows.append(
            {
                "local training (train_local)": t["train"],
                "evaluation (test set each round, hold-outs at the end)": t["eval"],
                "everything else (Flower loop, messages, identify, store)": wall
                - t["train"] - t["eval"],
                "total": wall,
            }
        )
    lines = [f"{'ms per round (median of ' + str(repetitions) + ' runs)':<58}  "
             f"{'engine*':>8}  {'plain':>8}"]
    lines.append("-" * len(lines[0]))
    for key in engine_rows[0]:
        e = statistics.median(r[key] for r in engine_rows) / rounds * 1e3
        p = (
            f"{statistics.median(r[key] for r in plain_rows) / rounds * 1e3:8.1f}"
            if key in plain_rows[0]
            else f"{'':>8}"
        )
        lines.append(f"{key:<58}  {e:8.1f}  {p}")
    lines.append("* engine with store writes and tree heads off (no_store_writes); timing "
                 "wrappers add a few microseconds per call")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 2 repetitions")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 20)")
    parser.add_argument("--repetitions", type=int, default=None, help="default 9")
    parser.add_argument("--no-what-if", action="store_true",
                        help="leave out the what-if variants (prototype of recommended changes)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides of _common.BENCH_CONFIG")
    args = parser.parse_args(argv)
    overrides = parse_assignments(args.set)
    rounds = args.rounds or (3 if args.quick else 20)
    repetitions = args.repetitions or (2 if args.quick else 9)

    torch.set_num_threads(1)  # the ClientApp does the same on every call
    proj = project()
    proj.load()  # the patches reach into the apps' modules
    finals: dict[str, list[Mapping[str, np.ndarray]]] = {}
    with scratch_dir("fedforget-bench-engine-") as scratch:
        counter = itertools.count()

        def fresh_run() -> tuple[Any, Path]:
            return (demo_config(num_rounds=rounds, **overrides),
                    scratch / f"run-{next(counter)}")

        def engine() -> None:
            cfg, out = fresh_run()
            train(cfg, out, project=proj)
            with HistoryStore.open(out) as store:
                finals.setdefault("engine", []).append(store.global_model(rounds))

        def engine_no_store() -> None:
            cfg, out = fresh_run()
            with no_store_writes() as kept:
                train(cfg, out, project=proj)
            finals.setdefault("engine, no store writes", []).append(kept.global_after[rounds])

        def plain() -> None:
            finals.setdefault("plain loop", []).append(plain_fedavg(fresh_run()[0]))

        def what_if() -> None:
            cfg, out = fresh_run()
            with what_if_fast_records():
                train(cfg, out, project=proj)
            with HistoryStore.open(out) as store:
                finals.setdefault(WHAT_IF, []).append(store.global_model(rounds))

        def what_if_no_store() -> None:
            cfg, out = fresh_run()
            with what_if_fast_records(), no_store_writes() as kept:
                train(cfg, out, project=proj)
            finals.setdefault(WHAT_IF + ", no store writes", []).append(
                kept.global_after[rounds]
            )

        variants = {
            "plain loop": plain,
            "engine": engine,
            "engine, no store writes": engine_no_store,
        }
        if not args.no_what_if:
            variants[WHAT_IF] = what_if
            variants[WHAT_IF + ", no store writes"] = what_if_no_store
        # Warm-up: imports, data caches, the first (slow) torch backward, one run of each.
        for run in variants.values():
            run()
        finals.clear()
        timings = interleave(variants, repetitions=repetitions)
        parts = breakdown(proj, fresh_run, rounds=rounds, repetitions=max(3, repetitions // 2))
        trained = {name: list(models) for name, models in finals.items()}
        with stubbed_training():  # untrained final models: not among those compared below
            fixed = interleave({name: variants[name] for name in
                                ("plain loop", "engine", "engine, no store writes")},
                               repetitions=repetitions)
        finals.clear()
        finals.update(trained)

    reference = finals["plain loop"][0]
    print(f"bench_engine: in-process engine vs plain PyTorch FedAvg loop ({environment()})")
    print(
        f"config: issue-2 demo ({describe(demo_config(num_rounds=rounds, **overrides))}), "
        f"{rounds} rounds"
        + (f", overrides {overrides}" if overrides else "") + "; "
        f"{repetitions} interleaved repetitions after one warm-up run of each variant; "
        f"engine variants write their store under {Path(scratch).parent}"
    )
    print()
    print("wall time per run (spread = (max - min) / median; ratio = median / median of plain")
    print("loop; paired ratios = variant / plain loop within each repetition)")
    print(timings.table(baseline="plain loop"))
    print()
    print("process CPU time per run, same runs (all threads; less disturbed by other load,")
    print("blind to I/O waits)")
    assert timings.cpu is not None
    print(timings.cpu.table(baseline="plain loop"))
    print()
    per_round = (f"{n} {timings.median(n) / rounds * 1e3:.1f} ms" for n in timings.names)
    print("per round (median): " + ", ".join(per_round))
    print()
    print("final model vs plain loop (every repetition of every variant):")
    identical = True
    for name, models in finals.items():
        diffs = [max_abs_difference(reference, m) for m in models]
        digests = {tensors_digest(m) for m in models}
        identical &= max(diffs) == 0.0
        print(
            f"  {name:<31} max |difference| = {max(diffs):.3g}; "
            f"distinct final digests: {len(digests)} ({sorted(digests)[0][:23]}...)"
        )
    print(f"  bit-identical everywhere: {'yes' if identical else 'NO'}")
    print()
    print("where the time goes:")
    print(parts)
    print()
    assert fixed.cpu is not None
    plain_fixed = fixed.cpu.median("plain loop") / rounds
    plain_round = timings.cpu.median("plain loop") / rounds
    print("fixed cost: the same runs with train_local training nothing (stubbed_training), "
          "process CPU time per round, median:")
    print(f"  plain loop {plain_fixed * 1e3:.2f} ms (the real plain loop: "
          f"{plain_round * 1e3:.1f} ms a round, so its local training is "
          f"{(plain_round - plain_fixed) * 1e3:.1f} ms)")
    calls = demo_config(num_rounds=rounds, **overrides).clients_per_round()
    for name in fixed.names[1:]:
        extra = fixed.cpu.median(name) / rounds - plain_fixed
        print(f"  {name:<24} {fixed.cpu.median(name) / rounds * 1e3:.2f} ms: "
              f"{extra * 1e3:.2f} ms a round more than the plain loop "
              f"({extra / calls * 1e3:.2f} ms per client call); engine / plain <= {GOAL} "
              f"needs >= {extra / (GOAL - 1) * 1e3:.1f} ms of plain-loop CPU a round "
              f"(this config: {plain_round * 1e3:.1f} ms)")
    print()
    for name in timings.names[1:]:
        ratio = timings.median(name) / timings.median("plain loop")
        paired = statistics.median(timings.paired_ratios(name, "plain loop"))
        verdict = "MET" if max(ratio, paired) <= GOAL else "NOT MET"
        if min(ratio, paired) <= GOAL < max(ratio, paired):
            verdict = "UNDECIDED (within noise)"
        cpu = timings.cpu.median(name) / timings.cpu.median("plain loop")
        print(f"goal {name} / plain <= {GOAL}: wall: ratio of medians {ratio:.3f}, median "
              f"paired ratio {paired:.3f} -> {verdict} (CPU-time ratio {cpu:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

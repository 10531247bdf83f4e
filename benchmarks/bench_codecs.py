"""Bytes per stored update parameter, and decoding error, of each update codec.

For each codec (``fp32``, ``fp16``, ``bf16``) the script trains the same short run
(the issue-2 demo, ``_common.BENCH_CONFIG``, 5 rounds by default, every round retained)
on the in-process engine with the real history store, then measures

* bytes per stored parameter = bytes of all update blobs (the files, headers included)
  / number of stored update parameters (stored updates x parameters per update);
* the payload-only figure (:func:`fedforget.tensors.bytes_per_parameter`);
* the whole run directory's blob bytes (global models are always fp32);
* the largest absolute error of every decoded update against the fp32 run's update of the
  same client and round (training does not depend on the codec: the final model digests of
  the three runs are checked equal), also relative to the largest update magnitude.

Usage: ``python benchmarks/bench_codecs.py [--quick] [--rounds R]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import demo_config, describe, environment, project, scratch_dir, train

from fedforget.history import HistoryStore
from fedforget.tensors import CODECS, bytes_per_parameter, num_parameters


def stored_updates(directory: Path) -> dict[tuple[int, str], tuple[dict[str, np.ndarray], int]]:
    """(round, client) -> (decoded update, blob size) for every retained update."""
    out: dict[tuple[int, str], tuple[dict[str, np.ndarray], int]] = {}
    with HistoryStore.open(directory) as store:
        for record in store.rounds():
            for p in record.participants:
                if p.retained:
                    size = store.blob_location(p.update_digest).nbytes
                    out[(record.round, p.client_id)] = (
                        store.client_update(record.round, p.client_id),
                        size,
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 5)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)

    torch.set_num_threads(1)
    proj = project()
    updates: dict[str, dict[tuple[int, str], tuple[dict[str, np.ndarray], int]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    with scratch_dir("fedforget-bench-codecs-") as scratch:
        for codec in CODECS:
            train(demo_config(num_rounds=rounds, codec=codec), scratch / codec, project=proj)
            updates[codec] = stored_updates(scratch / codec)
            with HistoryStore.open(scratch / codec) as store:
                summaries[codec] = store.summary()

    reference = updates["fp32"]
    first = next(iter(reference.values()))[0]
    params_per_update = num_parameters(first)
    print(f"bench_codecs: update codecs of the history store ({environment()})")
    print(
        f"config: issue-2 demo ({describe(demo_config(num_rounds=rounds))}; "
        f"{params_per_update} parameters), {rounds} rounds: {len(reference)} stored updates "
        "per codec"
    )
    print()
    head = (
        f"{'codec':<6}  {'update bytes':>12}  {'stored params':>13}  {'bytes/param':>11}  "
        f"{'payload only':>12}  {'vs fp32':>7}  {'all blobs':>10}  {'max |err|':>9}  "
        f"{'max |err| / max |update|':>24}"
    )
    print(head)
    print("-" * len(head))
    fp32_bytes = sum(size for _, size in reference.values())
    for codec in CODECS:
        stored = updates[codec]
        if set(stored) != set(reference):
            raise RuntimeError(f"{codec}: stored updates differ from fp32's")
        total = sum(size for _, size in stored.values())
        params = sum(num_parameters(u) for u, _ in stored.values())
        error = 0.0
        magnitude = 0.0
        for key, (update, _) in stored.items():
            exact = reference[key][0]
            for name, value in update.items():
                diff = np.abs(value.astype(np.float64) - exact[name].astype(np.float64))
                error = max(error, float(diff.max()))
                magnitude = max(magnitude, float(np.abs(exact[name]).max()))
        print(
            f"{codec:<6}  {total:>12,}  {params:>13,}  {total / params:>11.4f}  "
            f"{bytes_per_parameter(codec):>12.1f}  {total / fp32_bytes:>7.3f}  "
            f"{summaries[codec]['bytes_stored']:>10,}  {error:>9.3g}  {error / magnitude:>24.3g}"
        )
    print()
    print(
        "bytes/param includes each blob's header (magic, length, JSON with names, shapes, "
        f"dtypes: {(fp32_bytes - 4 * len(reference) * params_per_update) // len(reference)} B "
        "per update); 'all blobs' adds the fp32 global models (one per round plus the initial)."
    )
    digests = {codec: s["final_model_digest"] for codec, s in summaries.items()}
    same = len(set(digests.values())) == 1
    print(
        f"final model digests of the three runs: {'identical' if same else 'DIFFERENT'} "
        f"({digests['fp32'][:23]}...)"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the benchmark scripts: config, interleaved timing, benchmark-local patches.

Nothing here changes library code. The patches (:func:`no_store_writes`,
:func:`store_without_fsync`) replace attributes for the duration of a ``with`` block only,
inside the benchmark process, and are labelled as such in every table that uses them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# The demo configuration of issue 2: ``simulations/demo.toml`` as of commit 115b237 (digits,
# 10 clients, Dirichlet(0.5), MLP, 2 local epochs, batch 16, lr 0.1). Pinned here because the
# file has since changed (more rounds and local epochs, a backdoor client for the unlearning
# demo) and may change while a benchmark runs; every key left out takes RunConfig's default.
BENCH_CONFIG: dict[str, Any] = {
    "seed": 0,
    "num-clients": 10,
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "holdout-fraction": 0.2,
    "model": "mlp",
    "hidden-size": 64,
    "local-epochs": 2,
    "learning-rate": 0.1,
    "batch-size": 16,
    "strategy": "fedavg",
    "sample-fraction": 1.0,
    "retain-interval": 1,
    "codec": "fp32",
}


def demo_config(*, num_rounds: int, **overrides: Any) -> Any:
    """The issue-2 demo configuration (:data:`BENCH_CONFIG`) with ``num-rounds`` and
    ``overrides`` (kebab-case keys)."""
    from fedforget.config import RunConfig

    values = dict(BENCH_CONFIG)
    values["num-rounds"] = num_rounds
    values.update(overrides)
    return RunConfig.from_mapping(values)


def train(cfg: Any, out: str | Path, *, engine: str = "inprocess", project: Any = None,
          **settings: Any) -> None:
    """``fedforget.engine.run_training(cfg, out=out, ...)`` without progress output."""
    from fedforget.engine import run_training

    run_training(cfg, out=out, engine=engine, project=project, progress=False, **settings)


def describe(cfg: Any) -> str:
    """The training settings of ``cfg`` that the benchmarks rely on, in one line."""
    keys = ("dataset", "num-clients", "partitioner", "dirichlet-alpha", "model", "hidden-size",
            "local-epochs", "batch-size", "learning-rate", "strategy", "sample-fraction",
            "retain-interval", "codec", "seed")
    values = cfg.to_mapping()
    backdoor = values.get("backdoor-clients") or "none"
    return ", ".join(f"{k} {values[k]}" for k in keys if k in values) + f", backdoor {backdoor}"


def project() -> Any:
    """The Flower project of this repository (its ServerApp and ClientApp)."""
    from fedforget.engine.apps import find_project

    return find_project(ROOT)


def environment() -> str:
    """One line describing the machine and library versions, with the CPU kernels PyTorch
    dispatches to (model digests differ between kernel sets: ``fedforget.environment``)."""
    import flwr

    from fedforget.environment import compute_environment

    env = compute_environment()
    load = os.getloadavg()
    return (
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} | {env['machine']}, "
        f"{os.cpu_count()} cores, no GPU | Python {env['python']}, "
        f"torch {env['torch']} ({env['cpu_capability']} kernels), flwr {flwr.__version__}, "
        f"numpy {env['numpy']} | load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory (under ``$TMPDIR``, default /tmp), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- timing
@dataclass
class Timings:
    """Times (seconds) of several variants measured in interleaved repetitions.

    ``samples`` are wall times; ``cpu``, when set, holds the process CPU times (all threads
    of this process, user + system) of the same runs: less disturbed by other work on the
    machine, but blind to waits (fsync, sleeps) and to child processes.
    """

    names: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu: Timings | None = None

    def add(self, name: str, seconds: float) -> None:  # noqa: D102
        self.samples.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:  # noqa: D102
        return statistics.median(self.samples[name])

    def spread(self, name: str) -> float:
        """(max - min) / median of a variant's samples: how noisy it was."""
        values = self.samples[name]
        return (max(values) - min(values)) / statistics.median(values)

    def paired_ratios(self, name: str, baseline: str) -> list[float]:
        """``name / baseline`` within each repetition (the two ran back to back)."""
        return [a / b for a, b in zip(self.samples[name], self.samples[baseline], strict=True)]

    def table(self, *, per: int = 1, unit: str = "s", baseline: str | None = None) -> str:
        """Median, min, max and spread per variant; ratios of medians to ``baseline``.

        ``per`` divides every time (e.g. the number of rounds, for a per-round time).
        """
        baseline = baseline or self.names[0]
        width = max(len(n) for n in self.names)
        head = (
            f"{'variant':<{width}}  {'median':>9}  {'min':>9}  {'max':>9}  {'spread':>6}  "
            f"{'ratio':>6}  {'paired ratios (median; min..max)':>32}"
        )
        lines = [head, "-" * len(head)]
        for name in self.names:
            values = [v / per for v in self.samples[name]]
            med = statistics.median(values)
            ratio = self.median(name) / self.median(baseline)
            if name == baseline:
                paired = "(baseline)"
            else:
                pr = self.paired_ratios(name, baseline)
                paired = f"{statistics.median(pr):.3f}; {min(pr):.3f}..{max(pr):.3f}"
            lines.append(
                f"{name:<{width}}  {_fmt(med, unit):>9}  {_fmt(min(values), unit):>9}  "
                f"{_fmt(max(values), unit):>9}  {self.spread(name):>5.0%}  {ratio:>6.3f}  "
                f"{paired:>32}"
            )
        return "\n".join(lines)


def _fmt(seconds: float, unit: str) -> str:
    if unit == "ms":
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.3f} s"


def interleave(
    variants: Mapping[str, Callable[[], Any]], *, repetitions: int, verbose: bool = True
) -> Timings:
    """Run every variant once per repetition, in turn (A B C A B C ...), timing each
    (wall time, and process CPU time in ``.cpu``).

    The order rotates by one each repetition (A B C, B C A, C A B, ...), so no variant always
    runs first after a pause or always right after the same other one.
    """
    names = list(variants)
    timings = Timings(names=names, cpu=Timings(names=names))
    assert timings.cpu is not None
    for rep in range(repetitions):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            cpu_start = time.process_time()
            start = time.perf_counter()
            variants[name]()
            timings.add(name, time.perf_counter() - start)
            timings.cpu.add(name, time.process_time() - cpu_start)
        if verbose:
            done = ", ".join(f"{n} {timings.samples[n][-1]:.3f} s" for n in names)
            print(f"  repetition {rep + 1}/{repetitions}: {done}", file=sys.stderr, flush=True)
    return timings


# ---------------------------------------------------------------------- benchmark-local patches
_PLACEHOLDER_DIGEST = "sha256:" + "0" * 64


@dataclass
class SkippedCommits:
    """What :func:`no_store_writes` kept of the commits it skipped (for equality checks)."""

    global_after: dict[int, Mapping[str, np.ndarray]] = field(default_factory=dict)


@contextlib.contextmanager
def no_tree_heads() -> Iterator[None]:
    """BENCHMARK-LOCAL PATCH: the ServerApp signs no tree head per round and sends none to
    clients.

    Since the erasure receipts (commit 02ab2f8) the server's head signer
    (``fedforget.history.heads.HeadLog`` since the history-integrity work;
    ``fedforget.receipts.issuer.HeadSigner`` and ``server.receipts.HeadSigner`` before)
    appends every committed round to a Merkle tree, signs a tree head (Ed25519), appends it
    to ``tree_heads.jsonl``, and every train message carries the latest head, which each
    client writes to its state directory. Inside the block ``on_commit`` does nothing and
    ``config`` returns no entry (so clients write nothing either); the run's signing key is
    still created, and the head signed when the run starts still is.
    """
    import importlib

    signer = None
    for module, name in (("fedforget.history.heads", "HeadLog"),
                         ("fedforget.receipts.issuer", "HeadSigner"),
                         ("server.receipts", "HeadSigner")):
        try:
            signer = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if signer is not None:
            break
    if signer is None:
        yield
        return
    originals = {name: signer.__dict__[name] for name in ("on_commit", "config")}

    def skip_commit(self: Any, record: Any) -> None:
        return None

    def no_config(self: Any) -> dict[str, str]:
        return {}

    signer.on_commit = skip_commit
    signer.config = no_config
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(signer, name, value)


@contextlib.contextmanager
def no_store_writes() -> Iterator[SkippedCommits]:
    """BENCHMARK-LOCAL PATCH: ``HistoryStore.commit_round`` does nothing, nor do its two
    halves ``prepare_round`` and ``write_round`` (store format 2, which ``HistoryRecording``
    calls when it commits on a writer thread), and (with :func:`no_tree_heads`) no tree head
    is signed over the rounds that were not committed.

    Inside the block no round is encoded, hashed, written or fsynced; everything else of the
    engine runs as usual (the initial model is still stored; the wrapper still validates
    replies, computes the updates and the digest of each new global model). The aggregated
    model of each round is kept in memory so that the result can still be checked, and the
    caller gets the round's :class:`RoundRecord` back (built in memory, with placeholder
    digests), as from the real method. Needs the apps loaded (``project().load()``).
    """
    from fedforget.history.records import ParticipantRecord, RoundRecord, utc_now
    from fedforget.history.store import HistoryStore

    kept = SkippedCommits()
    names = [n for n in ("commit_round", "prepare_round", "write_round")
             if n in HistoryStore.__dict__]
    originals = {name: HistoryStore.__dict__[name] for name in names}

    def skip_commit(
        self: HistoryStore,
        *,
        round: int,
        global_before: str,
        global_after: Any,
        participants: Any,
        config: Any,
        refused: Any = (),
        committed_at: str | None = None,
    ) -> RoundRecord:
        kept.global_after[round] = global_after
        # The record the caller expects back, with placeholder digests (nothing is hashed).
        return RoundRecord(
            round=round,
            global_before=global_before,
            global_after=_PLACEHOLDER_DIGEST,
            participants=tuple(
                ParticipantRecord(
                    client_id=p.client_id, num_examples=p.num_examples, weight=p.weight,
                    update_digest=_PLACEHOLDER_DIGEST, retained=False, metrics=p.metrics,
                    seed=p.seed,
                )
                for p in participants
            ),
            refused=tuple(refused),
            config=config,
            committed_at=committed_at or utc_now(),
            run_digest=_PLACEHOLDER_DIGEST,
        )

    def skip_write(self: HistoryStore, prepared: RoundRecord) -> RoundRecord:
        return prepared  # skip_commit's record, handed over by prepare_round

    HistoryStore.commit_round = skip_commit  # type: ignore[method-assign]
    if "prepare_round" in originals:
        HistoryStore.prepare_round = skip_commit  # type: ignore[method-assign,assignment]
        HistoryStore.write_round = skip_write  # type: ignore[method-assign,assignment]
    try:
        with no_tree_heads():
            yield kept
    finally:
        for name, original in originals.items():
            setattr(HistoryStore, name, original)


@contextlib.contextmanager
def _keyword_default(function: Any, name: str, value: Any) -> Iterator[None]:
    """Change the default of the keyword-only argument ``name`` of ``function`` for a block."""
    defaults = function.__kwdefaults__
    if not defaults or name not in defaults:
        raise RuntimeError(f"{function.__qualname__} has no keyword-only argument {name!r}")
    original = defaults[name]
    defaults[name] = value
    try:
        yield
    finally:
        defaults[name] = original


@contextlib.contextmanager
def store_without_fsync() -> Iterator[None]:
    """BENCHMARK-LOCAL PATCH: history stores are created and opened with ``fsync=False``.

    Changes the default of the ``fsync`` argument of ``HistoryStore.create`` and
    ``HistoryStore.open`` (the ServerApp passes none), wherever they are called from.
    """
    from fedforget.history.store import HistoryStore

    create = HistoryStore.__dict__["create"].__func__  # the functions behind the classmethods
    open_ = HistoryStore.__dict__["open"].__func__
    with _keyword_default(create, "fsync", False), _keyword_default(open_, "fsync", False):
        yield


_INHERITED = object()


@contextlib.contextmanager
def timed_calls(targets: list[tuple[Any, str, str]]) -> Iterator[dict[str, float]]:
    """BENCHMARK-LOCAL PATCH: accumulate the wall time spent in each ``owner.attribute``.

    ``targets`` lists ``(owner, attribute, label)``; the owner is a module or a class whose
    attribute is replaced by a timing wrapper for the duration of the block. Times are
    inclusive (a call to a timed function from another timed one counts in both). A target
    the owner does not have is skipped (its total stays 0). ``label + " calls"`` counts the
    calls, ``label + " cpu"`` adds up the CPU time of the calling thread inside them
    (``time.thread_time``: the thread's own CPU, not its waits).
    """
    totals: dict[str, float] = {}
    for _, _, label in targets:
        totals[label] = totals[label + " calls"] = totals[label + " cpu"] = 0.0
    originals: list[tuple[Any, str, Any]] = []

    def wrapper(function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                totals[label + " cpu"] += time.thread_time() - cpu
                totals[label] += time.perf_counter() - start
                totals[label + " calls"] += 1

        return timed

    try:
        for owner, attribute, label in targets:
            if not hasattr(owner, attribute):  # renamed in the library: report 0
                continue
            # A class attribute inherited from a base is removed again afterwards.
            original = owner.__dict__.get(attribute, _INHERITED)
            originals.append((owner, attribute, original))
            setattr(owner, attribute, wrapper(getattr(owner, attribute), label))
        yield totals
    finally:
        for owner, attribute, original in reversed(originals):
            if original is _INHERITED:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)


@contextlib.contextmanager
def stubbed_training() -> Iterator[None]:
    """BENCHMARK-LOCAL PATCH: ``train_local`` trains nothing in the ClientApp and in every
    benchmark script loaded (it returns the model unchanged with the data's example count),
    so that a run costs everything but local training."""
    from fedforget.training import TrainResult

    def untrained(model: Any, data: Any, **_: Any) -> TrainResult:
        return TrainResult(num_examples=len(data), loss=0.0, steps=0)

    owners = [m for name, m in list(sys.modules.items())
              if (name.endswith("clients.app") or name.startswith("bench_")
                  or name == "__main__") and hasattr(m, "train_local")]
    saved = [(m, m.train_local) for m in owners]
    try:
        for m in owners:
            m.train_local = untrained
        yield
    finally:
        for m, original in saved:
            m.train_local = original


@contextlib.contextmanager
def commits_on_main_thread() -> Iterator[None]:
    """BENCHMARK-LOCAL PATCH: ``HistoryRecording`` commits synchronously.

    Changes the default of ``background_commit`` of
    ``fedforget.strategies.history.HistoryRecording`` to False (the federation passes none):
    each round is committed before the next starts.
    """
    from fedforget.strategies.history import HistoryRecording as recording

    with _keyword_default(recording.__init__, "background_commit", False):
        yield


@contextlib.contextmanager
def what_if_fast_records() -> Iterator[None]:
    """BENCHMARK-LOCAL PATCH, a what-if (not what the library does): Flower's own ``Array``
    conversions made fast, in every caller.

    * ``Array.numpy()`` reads the ``.npy`` payload with ``np.frombuffer`` (plus a copy)
      instead of ``np.load``, which parses the header with ``ast.literal_eval``;
    * ``Array(ndarray)`` prepends a cached ``.npy`` header to ``tobytes()`` instead of
      calling ``np.save``; the bytes are identical to ``np.save``'s.

    fedforget's own conversions (``fedforget.task.from_array_record`` / ``to_array_record``)
    do this since commit b78c5fd; what this adds on such code is Flower's FedAvg, which
    decodes every reply again through ``Array.numpy()``. Arrays that are not plain
    little-endian C-order numeric arrays take the original path.
    """
    import io
    import math

    from flwr.app import Array

    original_numpy = Array.numpy
    original_from_numpy = Array.__dict__["from_numpy_ndarray"]
    headers: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def fast_numpy(self: Any) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        nbytes = math.prod(self.shape) * dtype.itemsize
        header = self.data[: len(self.data) - nbytes]
        if (
            self.stype != "numpy.ndarray"
            or dtype.byteorder == ">"
            or dtype.kind not in "biuf"
            or b"'fortran_order': False" not in header
        ):
            return original_numpy(self)
        return np.frombuffer(self.data, dtype=dtype, offset=len(header)).reshape(
            self.shape
        ).copy()

    def fast_from_numpy(cls: type, ndarray: np.ndarray) -> Any:
        if (
            not isinstance(ndarray, np.ndarray)
            or not ndarray.flags.c_contiguous
            or ndarray.dtype.kind not in "biuf"
            or ndarray.dtype.byteorder == ">"
        ):
            return original_from_numpy.__func__(cls, ndarray)
        key = (ndarray.dtype.str, tuple(ndarray.shape))
        header = headers.get(key)
        if header is None:
            buffer = io.BytesIO()
            np.save(buffer, np.zeros(ndarray.shape, ndarray.dtype), allow_pickle=False)
            header = headers[key] = buffer.getvalue()[: buffer.tell() - ndarray.nbytes]
        return Array(dtype=str(ndarray.dtype), shape=tuple(ndarray.shape),
                     stype="numpy.ndarray", data=header + ndarray.tobytes())

    Array.numpy = fast_numpy  # type: ignore[method-assign]
    Array.from_numpy_ndarray = classmethod(fast_from_numpy)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Array.numpy = original_numpy  # type: ignore[method-assign]
        Array.from_numpy_ndarray = original_from_numpy  # type: ignore[method-assign]

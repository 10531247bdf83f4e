"""Subtraction: remove the forgotten clients' stored contributions, server-side.

FedAccum-style (the uncalibrated baseline of Liu et al., IWQoS 2021,
https://arxiv.org/abs/2012.13891). Under FedAvg the final model is the sum of the
aggregated updates, :math:`\\theta_T = \\theta_0 + \\sum_t \\sum_k w_{t,k} \\Delta_{t,k}`. Take
the forgotten clients :math:`F` out of every round and renormalise the remaining weights:

.. math::

    \\tilde\\theta = \\theta_0 + \\sum_{t=1}^{T} \\sum_{k \\notin F}
        \\frac{W_t\\, w_{t,k}}{\\sum_{j \\notin F} w_{t,j}} \\Delta_{t,k},
    \\qquad W_t = \\sum_k w_{t,k}

(:math:`w_{t,k} = n_k / \\sum_j n_j` under FedAvg, so the weights become
:math:`n_k / \\sum_{j \\notin F} n_j`). Rounds without a forgotten client contribute what they
contributed before, so the same model is reached from the final one through the
per-round residuals of the rounds :math:`P_F` in which a forgotten client took part:

.. math::

    \\tilde\\theta = \\theta_T + \\sum_{t \\in P_F} r_t, \\qquad
    r_t = \\sum_{k \\notin F} \\Big(\\frac{W_t\\, w_{t,k}}{\\sum_{j \\notin F} w_{t,j}}
        - w_{t,k}\\Big) \\Delta_{t,k} - \\sum_{k \\in F} w_{t,k} \\Delta_{t,k}

which is what is computed: only the rounds in :math:`P_F` need stored updates, and the
untouched rounds keep their exact fp32 sum. A round in which only forgotten clients took
part contributes nothing (:math:`r_t = -\\sum_k w_{t,k}\\Delta_{t,k}`).

Reading only what the rule needs. When every round's global model is the weighted mean of
the clients' models, :math:`\theta_t = \theta_{t-1} + \\sum_k w_{t,k}\\Delta_{t,k} / W_t`
(FedAvg, FedProx: the history records this as its ``aggregation``, ``weighted-mean``), the
remaining clients' sum is the round's aggregate minus the forgotten clients' part:
with :math:`A_t = \\sum_{k \\in F} w_{t,k}\\Delta_{t,k}`, :math:`R_t = \\sum_{k \notin F} w_{t,k}`
and :math:`c_t = (W_t - R_t) / R_t`,

.. math::

    r_t = c_t\\, W_t (\theta_t - \theta_{t-1}) - (1 + c_t)\\, A_t

so a round needs the forgotten clients' updates and two global models instead of every
participant's update (``shortcut``, on by default where the history allows it; the general
rule above is kept and gives the same model up to float32 rounding of the stored models).
Blobs shared between terms (:math:`\theta_t` of one round is :math:`\theta_{t-1}` of the
next) are read once, their coefficients summed; every blob is read through
:class:`~fedforget.history.views.BlobViews` (mapped, not copied, digests checked on a thread
pool while the sum runs) and summed in float64 chunk by chunk over all blobs (cache
blocking: one read of each blob, one write of the result). On models of
:data:`_BLAS_FROM` parameters or more with float32 blobs, each chunk is summed by PyTorch
(``acc.add_(x, alpha=c)``: the float32 values widened inside the kernel, no scratch
copy, and split over PyTorch's intra-op threads, or on one thread while digests are still
being computed: the first read of a blob in this process, when PyTorch's threads would
take the cores the hashing needs). Each element is then rounded as
PyTorch's vectorised multiply-add rounds it (once, fused, on AVX2 and AVX-512 CPUs, as in
BLAS daxpy's body; daxpy's last few elements of a call are rounded twice); the result does
not depend on the chunking or the threads, and ``tests/test_unlearning_subtract.py``
checks it bit for bit against PyTorch's sum over whole arrays (and the NumPy and BLAS
paths against theirs).

This is an approximation of retraining: every update after the forgotten clients' first
contribution was computed from a model that held their influence, and stays as it was.
An optional repair runs ordinary rounds with the remaining clients afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedforget.errors import ConfigError
from fedforget.history import HistoryStore
from fedforget.history.views import BlobViews, StoredBlob
from fedforget.settings import WEIGHTED_MEAN
from fedforget.tensors import StoredTensor
from fedforget.unlearning.base import (
    MethodParams,
    RetentionError,
    TensorDict,
    Unlearner,
    UnlearningError,
    UnlearningRequest,
    UnlearningResult,
    check_range,
    register,
)

SHORTCUT_CHOICES = ("auto", "on", "off")

_CHUNK = 32768
"""Elements per step of the sum: its float64 buffers (2 x 256 KiB) stay in cache. A power
of two: BLAS kernels compute the last elements of a call (past a multiple of their unroll)
in plain arithmetic, so chunk boundaries on such multiples leave every element's rounding
as one call over the whole tensor gives it."""
_GROUP_BYTES = 1 << 29  # bytes of blobs open (mapped) at once
_GROUP_BLOBS = 256  # blobs open at once
_BLAS_FROM = 1 << 20  # floating parameters from which BLAS (or PyTorch) is worth its import
_TORCH_CHUNK = 1 << 18
"""Elements per step of the PyTorch sum: a float64 chunk of 2 MiB, split between PyTorch's
threads (its grain is 32 K elements), stays in the last-level cache."""
_TORCH_DTYPES = frozenset(["<f4"])
"""Stored dtypes the PyTorch sum reads (bf16 and fp16 blobs take the NumPy path)."""


@dataclass(frozen=True)
class SubtractParams(MethodParams):
    """Parameters of :class:`Subtract`.

    Attributes
    ----------
    repair_rounds
        Ordinary rounds with the remaining clients after the subtraction (0: none, no
        client work).
    repair_epochs
        Local epochs of each repair round; 0 (default) reads the run's ``local-epochs``.
    shortcut
        ``auto`` (default): read only the forgotten clients' updates and the global models
        where the history's aggregation is a weighted mean, every participant's update
        otherwise; ``on``: the shortcut, refused on a history that does not allow it;
        ``off``: always the general rule.
    """

    repair_rounds: int = 0
    repair_epochs: int = 0
    shortcut: str = "auto"

    def validate(self) -> None:
        """Refuse out-of-range values with a ConfigError naming the parameter."""
        check_range("repair-rounds", self.repair_rounds, low=0)
        check_range("repair-epochs", self.repair_epochs, low=0)
        if self.shortcut not in SHORTCUT_CHOICES:
            raise ConfigError(f"shortcut = {self.shortcut!r}; expected one of "
                              f"{', '.join(SHORTCUT_CHOICES)}")


# --------------------------------------------------------------- shared helpers
def contributed_rounds(store: HistoryStore, clients: Iterable[str]) -> list[int]:
    """:math:`P_F`: the rounds in which any of ``clients`` took part, ascending."""
    return sorted({t for c in set(clients) for t in store.client_rounds(c)})


def check_contributions_retained(
    store: HistoryStore, forget: frozenset[str], method: str
) -> list[int]:
    """Return :math:`P_F`; raise RetentionError if any of its updates was not kept."""
    needed = contributed_rounds(store, forget)
    missing = [t for t in needed if not store.is_retained(t)]
    if missing:
        kept = store.retain_interval
        raise RetentionError(
            f"{method} needs the stored client updates of every round a forgotten client "
            f"took part in ({needed}); the history keeps them only every {kept} rounds "
            f"(1, {1 + kept}, {1 + 2 * kept}, ...), so rounds {missing} are missing; record "
            "with retain-interval 1, or use an exact method (retrain, rollback)"
        )
    return needed


def aggregation_of(store: HistoryStore) -> str | None:
    """How the history's global models were aggregated, as far as it records.

    The ``aggregation`` of the recording settings (written by fedforget's strategy
    wrapper); for a run of fedforget's own app recorded before that, ``weighted-mean`` when
    its ``strategy`` is ``fedavg`` or ``fedprox``; None when unknown.
    """
    recorded = store.recording.get("aggregation")
    if isinstance(recorded, str):
        return recorded
    from fedforget.config import RunConfig

    config = store.run_config
    if set(config) == set(RunConfig.keys()) and config.get("strategy") in ("fedavg", "fedprox"):
        return WEIGHTED_MEAN
    return None


Term = tuple[float, str, str]
"""``(coefficient, blob digest, where)``: one stored blob of a linear combination."""


def removal_terms(store: HistoryStore, t: int, forget: frozenset[str], *,
                  shortcut: bool) -> list[Term]:
    """:math:`r_t` as a linear combination of stored blobs (see the module).

    General rule: every participant's update with its coefficient; ``shortcut``: the
    forgotten clients' updates and the round's two global models (valid only when the
    round's model is the weighted mean of the clients'). No term when no forgotten client
    took part.
    """
    record = store.round(t)
    participants = record.participants
    forgotten = [p for p in participants if p.client_id in forget]
    if not forgotten:
        return []
    total = sum(p.weight for p in participants)
    remaining = sum(p.weight for p in participants if p.client_id not in forget)

    def where(client: str) -> str:
        return f"round {t}, client {client!r}"

    if shortcut and remaining > 0:
        c = (total - remaining) / remaining
        before = "initial model (round 0)" if t == 1 else f"round {t - 1}, global model"
        terms: list[Term] = [(c * total, record.global_after, f"round {t}, global model"),
                             (-c * total, record.global_before, before)]
        return terms + [(-(1.0 + c) * p.weight, p.update_digest, where(p.client_id))
                        for p in forgotten]
    terms = []
    for p in participants:
        if p.client_id in forget:
            coef = -p.weight
        elif remaining > 0:
            coef = p.weight * total / remaining - p.weight
        else:  # remaining clients of weight zero contributed nothing and still do not
            coef = 0.0
        if coef != 0.0:
            terms.append((coef, p.update_digest, where(p.client_id)))
    return terms


def merge_terms(terms: Iterable[Term]) -> list[Term]:
    """The terms with one entry per blob (coefficients summed, first ``where`` kept, order
    of first appearance); exact zeros dropped."""
    coefs: dict[str, float] = {}
    wheres: dict[str, str] = {}
    for coef, digest, where in terms:
        coefs[digest] = coefs.get(digest, 0.0) + coef
        wheres.setdefault(digest, where)
    return [(c, d, wheres[d]) for d, c in coefs.items() if c != 0.0]


def combine(views: BlobViews, terms: Sequence[Term], *, like: str | None = None,
            dtype: type[np.floating[Any]] = np.float64,
            ) -> tuple[dict[str, np.ndarray], StoredBlob | None]:
    r""":math:`\sum_i c_i x_i` over the floating tensors of the stored blobs ``terms``,
    summed in float64 and returned as ``dtype``; every digest checked.

    The sum is cache-blocked: the parameters are walked in chunks of :data:`_CHUNK`
    elements, and each chunk sums every blob of a group (up to :data:`_GROUP_BYTES` of
    blobs open at once: all of them for any model of a few million parameters) into a
    float64 buffer that stays in cache, so memory sees one read of each blob and one
    write of the result. Every element still gets the same float64 operations in the same
    order (term by term from float64 zeros): the result does not depend on the blocking
    (see :data:`_CHUNK`). A history needing more groups keeps a float64 accumulator
    between them.

    ``like`` (a blob digest) gives the tensor layout when ``terms`` is empty (zeros). The
    first term's blob is returned open (its non-floating tensors are the caller's); the
    others are released as they are used.

    Raises
    ------
    UnlearningError
        If the blobs do not share one tensor layout.
    IntegrityError
        If a blob is missing, truncated or altered.
    """
    head: StoredBlob | None = None
    layout: tuple[tuple[str, tuple[int, ...]], ...] = ()
    if not terms:
        if like is None:
            return {}, None
        head = views.open(like, "global model")
        views.check(head)
        return {t.name: np.zeros(t.shape, dtype) for t in head.tensors if t.floating}, head
    groups = _groups(views, terms)
    out: dict[str, np.ndarray] = {}
    wide: dict[str, np.ndarray] | None = None  # float64 partial sums between groups
    for index, (start, stop) in enumerate(groups):
        group = [(coef, views.open(digest, where)) for coef, digest, where in
                 terms[start:stop]]
        try:
            for _, blob in group:
                shape = tuple((t.name, t.shape) for t in blob.tensors if t.floating)
                if head is None:
                    head, layout = blob, shape
                    out = {name: np.empty(dims, dtype) for name, dims in layout}
                    if len(groups) > 1 and out and next(iter(out.values())).dtype != np.float64:
                        wide = {name: np.empty(dims, np.float64) for name, dims in layout}
                elif shape != layout:
                    raise UnlearningError(
                        f"{blob.where}: blob {blob.digest} holds tensors {list(shape)}; "
                        f"expected {list(layout)} as in {head.where}"
                    )
            target = wide if wide is not None else out
            _accumulate(target, group, fresh=index == 0)
        finally:
            for _, blob in group:
                if blob is not head:
                    views.release(blob)
    if wide is not None:
        for name, values in wide.items():
            np.copyto(out[name], values)
    views.check()
    return out, head


def _groups(views: BlobViews, terms: Sequence[Term]) -> list[tuple[int, int]]:
    """``terms`` cut into runs of blobs to open at once: at most :data:`_GROUP_BYTES`
    (and :data:`_GROUP_BLOBS`) each, at least one blob."""
    groups: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, (_, digest, _) in enumerate(terms):
        nbytes = views.nbytes(digest)
        if i > start and (size + nbytes > _GROUP_BYTES or i - start >= _GROUP_BLOBS):
            groups.append((start, i))
            start, size = i, 0
        size += nbytes
    groups.append((start, len(terms)))
    return groups


def _accumulate(out: dict[str, np.ndarray], group: Sequence[tuple[float, StoredBlob]], *,
                fresh: bool) -> None:
    """``out = sum(coef * blob)`` (``fresh``) or ``out += sum(coef * blob)``, tensor by
    tensor, chunk by chunk (see :func:`combine`)."""
    large = sum(a.size for a in out.values()) >= _BLAS_FROM
    if large and all(t.dtype in _TORCH_DTYPES for _, blob in group for t in blob.tensors
                     if t.name in out):
        _accumulate_torch(out, group, fresh=fresh,
                          one_thread=any(blob.hashing for _, blob in group))
        return
    axpy = _axpy() if large else _numpy_axpy
    with _one_blas_thread() if large else contextlib.nullcontext():
        _accumulate_with(out, group, axpy, fresh=fresh)


def _accumulate_with(out: dict[str, np.ndarray], group: Sequence[tuple[float, StoredBlob]],
                     axpy: Any, *, fresh: bool) -> None:
    """One chunk at a time: the float64 sum of the chunk is kept in ``acc`` (in cache)
    while every blob of the group is added to it, each blob's chunk widened to float64
    once (into ``wide``), then the chunk is written to ``out`` (rounded to its dtype)."""
    acc = np.empty(_CHUNK, np.float64)
    wide = np.empty(_CHUNK, np.float64)
    bits = np.empty(_CHUNK, np.uint32)
    for name, result in out.items():
        flat = result.reshape(-1)
        direct = flat.dtype == np.float64  # sum in place: the chunk is in cache anyway
        sources: list[tuple[float, np.ndarray, bool]] = []
        for coef, blob in group:
            tensor = _tensor(blob, name)
            sources.append((coef, blob.view(tensor).reshape(-1), tensor.dtype == "bf16"))
        n = flat.size
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            m = hi - lo
            target = flat[lo:hi] if direct else acc[:m]
            if fresh:
                target.fill(0.0)
            elif not direct:
                np.copyto(target, flat[lo:hi])
            scratch = wide[:m]
            for coef, source, bf16 in sources:
                x = source[lo:hi]
                if bf16:  # the upper 16 bits of binary32
                    np.left_shift(x, 16, out=bits[:m], dtype=np.uint32)
                    x = bits[:m].view(np.float32)
                np.copyto(scratch, x)  # exact: every stored float is a float64
                if coef == 1.0:
                    np.add(target, scratch, out=target)
                elif coef == -1.0:
                    np.subtract(target, scratch, out=target)
                else:
                    done = axpy(scratch, target, a=coef)  # target += coef * scratch
                    if done is not target:  # a wrapper that did not work in place
                        target[...] = done
            if not direct:
                np.copyto(flat[lo:hi], target)
            del x


def _accumulate_torch(out: dict[str, np.ndarray], group: Sequence[tuple[float, StoredBlob]],
                      *, fresh: bool, one_thread: bool) -> None:
    """:func:`_accumulate_with` by PyTorch, chunks of :data:`_TORCH_CHUNK` elements:
    ``acc.add_(x, alpha=coef)`` widens each float32 value to float64 in the kernel and
    multiplies and adds in float64 (the same bits on any number of threads; ``one_thread``
    leaves the other cores to the hashing)."""
    import torch

    acc = _torch_buffer(torch)
    threads = torch.get_num_threads()
    if one_thread and threads > 1:
        torch.set_num_threads(1)
    try:
        _torch_sums(out, group, acc, fresh=fresh)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _torch_buffer(torch: Any) -> Any:
    """This thread's float64 chunk buffer for :func:`_torch_sums` (kept: a new one costs
    its page faults, about 0.4 ms, on every call)."""
    buffer = getattr(_BUFFERS, "torch", None)
    if buffer is None or buffer.numel() != _TORCH_CHUNK:
        buffer = _BUFFERS.torch = torch.empty(_TORCH_CHUNK, dtype=torch.float64)
    return buffer


_BUFFERS = threading.local()


def _torch_sums(out: dict[str, np.ndarray], group: Sequence[tuple[float, StoredBlob]],
                acc: Any, *, fresh: bool) -> None:
    """The loop of :func:`_accumulate_torch` (``acc``: its float64 chunk buffer)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # The blobs are read-only mappings: PyTorch warns that its tensor would be writable;
        # nothing here writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, result in out.items():
            flat = torch.from_numpy(result.reshape(-1))
            direct = result.dtype == np.float64
            sources = [(coef, torch.from_numpy(blob.view(_tensor(blob, name)).reshape(-1)))
                       for coef, blob in group]
            n = flat.numel()
            for lo in range(0, n, _TORCH_CHUNK):
                hi = min(n, lo + _TORCH_CHUNK)
                target = flat[lo:hi] if direct else acc[:hi - lo]
                if fresh:
                    target.zero_()
                elif not direct:
                    target.copy_(flat[lo:hi])
                for coef, source in sources:
                    target.add_(source[lo:hi], alpha=coef)
                if not direct:
                    flat[lo:hi].copy_(target)


def _numpy_axpy(x: np.ndarray, y: np.ndarray, a: float = 1.0) -> np.ndarray:
    """``y += a * x`` in two NumPy passes (``x`` is scratch: it is scaled in place)."""
    np.multiply(x, a, out=x)
    return np.add(y, x, out=y)


def _axpy() -> Any:
    """``axpy(x, y, a=...)``: ``y += a * x`` in place on contiguous float64 vectors, by
    BLAS ``daxpy`` (SciPy, installed with scikit-learn: one fused pass) where available."""
    try:
        from scipy.linalg.blas import daxpy
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return _numpy_axpy
    return daxpy


def _one_blas_thread() -> Any:
    """BLAS on the calling thread only (a chunk is too small to share, and the other core
    hashes blobs). The loaded libraries are looked up once per process (a few ms each
    time otherwise), after SciPy's BLAS is loaded."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            return contextlib.nullcontext()
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


_BLAS_CONTROLLER: Any = None


def _tensor(blob: StoredBlob, name: str) -> StoredTensor:
    for tensor in blob.tensors:
        if tensor.name == name:
            return tensor
    raise UnlearningError(f"{blob.where}: blob {blob.digest} has no tensor {name!r}")


def removal_residual(store: HistoryStore, t: int, forget: frozenset[str], *,
                     shortcut: bool | None = None) -> TensorDict:
    """:math:`r_t`, the change to round ``t``'s aggregated update when ``forget`` leaves it.

    .. math::

        r_t = \\sum_{k \notin F} \\Big(\frac{W_t\\, w_{t,k}}{\\sum_{j \notin F} w_{t,j}}
            - w_{t,k}\\Big) \\Delta_{t,k} - \\sum_{k \\in F} w_{t,k} \\Delta_{t,k}

    Floating tensors only, in float64, in the stored updates' key order; zero when no
    forgotten client took part. ``shortcut`` (None: where the history allows it) computes
    it from the forgotten clients' updates and the round's global models (see the module).
    """
    use = aggregation_of(store) == WEIGHTED_MEAN if shortcut is None else shortcut
    terms = merge_terms(removal_terms(store, t, forget, shortcut=use))
    with BlobViews(store) as views:
        acc, _ = combine(views, terms, like=store.model_digest(t))
    return acc


def _zeros_like_floating(tensors: TensorDict) -> dict[str, np.ndarray]:
    """float64 zeros shaped like the floating tensors of ``tensors``."""
    return {k: np.zeros(v.shape, np.float64) for k, v in tensors.items() if v.dtype.kind == "f"}


def final_model(store: HistoryStore) -> TensorDict:
    """:math:`\theta_T`, the global model after the last round (the history's initial model
    when no round was committed)."""
    return store.global_model(store.last_round)


def apply_residuals(base: TensorDict, residuals: Iterable[tuple[float, TensorDict]]) -> TensorDict:
    """:math:`\theta + \\sum \\lambda r` in float64, returned in ``base``'s dtypes and order."""
    acc = {k: v.astype(np.float64) for k, v in base.items() if v.dtype.kind == "f"}
    for weight, residual in residuals:
        for k in acc:
            if k in residual:
                acc[k] += weight * residual[k]
    return {k: (acc[k].astype(v.dtype) if k in acc else v) for k, v in base.items()}


def run_local_epochs(store: HistoryStore, method: str) -> int:
    """The run's ``local-epochs`` (E) from the history's run config."""
    value = store.run_config.get("local-epochs")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnlearningError(
            f"{method}: the run config records local-epochs = {value!r}; expected an "
            "integer >= 1"
        )
    return value


# ------------------------------------------------------------------------ method
@register
class Subtract(Unlearner[SubtractParams]):
    """Remove the forgotten clients' weighted contributions from the model, server-side.

    :math:`\tilde\theta = \theta_T + \\sum_{t \\in P_F} r_t` (see the module docstring).
    Needs the stored updates of every round a forgotten client took part in; rounds
    without one need nothing, so a retain interval above 1 is served when the forgotten
    clients only took part in retained rounds. Equal to the removal from
    :math:`\theta_0` written in the module docstring when the global models are the
    recorded weighted sums (FedAvg, FedProx) and updates are stored in fp32 (checked on a
    recorded Flower run to float32 precision). With the shortcut only the forgotten
    clients' updates and the global models of :math:`P_F` are read (with fp16 or bf16
    updates the remaining clients' part then comes from the fp32 global models, exactly).

    The forget set is cumulative (every client withdrawn so far), so the model is rebuilt
    from the history's :math:`\theta_T`; ``request.current_model`` is not used (applying
    the residuals to it would subtract earlier withdrawals twice).

    Repair (``repair_rounds`` > 0): rounds :math:`T+1, \\dots, T+R` in which the
    federation's clients minus :math:`F` train from :math:`\tilde\theta` and
    :math:`\tilde\theta \\leftarrow \\sum_k n_k \theta_k / \\sum_k n_k`. These are
    plain requests through :meth:`Federation.train`, not recorded in the history.
    """

    name = "subtract"
    exact = False
    multi_client = True
    needs_clients = False  # true only with repair-rounds > 0 (see uses_clients)
    Params = SubtractParams

    def uses_clients(self) -> bool:
        """Only the repair rounds ask the clients for work."""
        return self.params.repair_rounds > 0

    def shortcut(self, store: HistoryStore) -> bool:
        """Whether this run reads only the forgotten clients' updates and global models."""
        if self.params.shortcut == "off":
            return False
        weighted = aggregation_of(store) == WEIGHTED_MEAN
        if self.params.shortcut == "on" and not weighted:
            raise UnlearningError(
                f"subtract with shortcut = on needs a history whose global models are the "
                f"weighted mean of the clients' (aggregation {WEIGHTED_MEAN!r}: FedAvg, "
                f"FedProx); this history records {aggregation_of(store)!r}; use "
                "shortcut = auto or off"
            )
        return weighted

    def check(self, request: UnlearningRequest) -> None:
        """Refuse, before any work, what the history's retention cannot serve."""
        super().check(request)
        check_contributions_retained(request.store, request.forget, self.name)
        self.shortcut(request.store)
        params = self.params
        if params.repair_rounds > 0:
            if getattr(request, "federation", None) is None:
                raise UnlearningError(
                    f"subtract with repair-rounds = {params.repair_rounds} needs the "
                    "federation; none was given"
                )
            if params.repair_epochs == 0:
                run_local_epochs(request.store, self.name)

    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Subtract the residuals, then repair if asked."""
        store, forget = request.store, request.forget
        params = self.params
        rounds = check_contributions_retained(store, forget, self.name)
        last = store.last_round
        if not rounds:
            return UnlearningResult(
                model=final_model(store),
                cost=request.federation.cost,
                rounds_affected=[],
                notes=["the forgotten clients never contributed: nothing to subtract"],
            )
        shortcut = self.shortcut(store)
        final = store.model_digest(last)
        terms: list[Term] = [(1.0, final, f"round {last}, global model")]
        for t in rounds:
            terms += removal_terms(store, t, forget, shortcut=shortcut)
        merged = merge_terms(terms)
        with BlobViews(store) as views:
            acc, head = combine(views, merged, like=final, dtype=np.float32)
            if head is None or head.digest != final:  # θ_T's other tensors are kept as they are
                head = views.open(final, f"round {last}, global model")
                views.check(head)
            model = {t.name: (acc[t.name] if t.floating
                              else np.array(head.view(t))) for t in head.tensors}
            read, blobs = views.bytes_read, views.blobs_read
        request.report(last, model)  # the subtraction takes θ_T's place
        notes = [
            f"subtracted the contributions of rounds {rounds} from the global model after "
            f"round {last}",
            f"read {blobs} stored blobs ({read} bytes): "
            + ("the forgotten clients' updates and the global models (weighted-mean "
               "shortcut)" if shortcut else "every participant's update of those rounds"),
        ]
        if params.repair_rounds > 0:
            model = self._repair(request, model, notes)
        return UnlearningResult(
            model=model, cost=request.federation.cost, rounds_affected=rounds, notes=notes
        )

    def _repair(
        self, request: UnlearningRequest, model: TensorDict, notes: list[str]
    ) -> TensorDict:
        """``repair_rounds`` ordinary FedAvg rounds of the remaining clients."""
        params = self.params
        store, federation = request.store, request.federation
        epochs = params.repair_epochs or run_local_epochs(store, self.name)
        clients = [c for c in federation.roster if c not in request.forget]
        if not clients:
            raise UnlearningError("subtract: no remaining client in the federation to repair with")
        last = store.last_round
        for i in range(1, params.repair_rounds + 1):
            replies = federation.train(
                server_round=last + i, global_model=model, clients=clients, local_epochs=epochs
            )
            total = sum(replies[c].num_examples for c in sorted(replies))
            if not replies or total <= 0:
                raise UnlearningError(
                    f"subtract: repair round {last + i} got no usable reply from {clients}"
                )
            acc = _zeros_like_floating(model)
            for c in sorted(replies):
                reply = replies[c]
                for k in acc:
                    acc[k] += (reply.num_examples / total) * reply.local_model[k].astype(np.float64)
            model = {k: (acc[k].astype(v.dtype) if k in acc else v) for k, v in model.items()}
            request.report(last + i, model)
        notes.append(
            f"repaired with {params.repair_rounds} round(s) of {epochs} epoch(s) "
            f"(rounds {last + 1}..{last + params.repair_rounds}) by {clients}"
        )
        return model

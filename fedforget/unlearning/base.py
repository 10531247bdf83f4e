"""The unlearning interface: one :class:`Unlearner` per method, a registry by name.

An unlearner gets the recorded history, the clients to forget and a handle to the
federation (:class:`Federation`), and returns the unlearned model with its cost. Methods
that need client work ask the federation for it: the federation sends Flower messages
through the same Grid to the same ClientApp as training, so there is no second training
loop anywhere. A new method is one new module and one ``@register`` line.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from fedforget.cost import Cost
from fedforget.erasure import ErasureScope
from fedforget.errors import ConfigError, FedForgetError
from fedforget.history import HistoryStore
from fedforget.registry import Registry

TensorDict = dict[str, np.ndarray]


class UnlearningError(FedForgetError):
    """An unlearning run could not be done as asked (the message says why)."""


class RetentionError(UnlearningError):
    """The history's retention dropped what a method needs."""


# ---------------------------------------------------------------------- federation
@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a training request."""

    client_id: str
    local_model: TensorDict
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Federation(Protocol):
    """What an unlearner may ask of the federation (implemented by the ServerApp).

    Every request goes through the Flower Grid to the clients' ClientApp; ``cost``
    accumulates client-epochs, rounds and bytes of everything asked.
    """

    cost: Cost

    @property
    def roster(self) -> tuple[str, ...]:
        """Every client id of the federation, sorted."""
        ...

    def replay(
        self,
        *,
        store: HistoryStore,
        start_round: int,
        end_round: int,
        exclude: Iterable[str],
        progress_label: str = "round",
    ) -> TensorDict:
        """Run ordinary training rounds ``start_round..end_round`` from the store's
        global model after ``start_round - 1``, with the run's schedule and seeds minus
        ``exclude``, committing each round to ``store``; return the final model."""
        ...

    def train(
        self,
        *,
        server_round: int,
        global_model: TensorDict,
        clients: Sequence[str],
        local_epochs: int | None = None,
        task: str = "train",
        extra_config: Mapping[str, Any] | None = None,
    ) -> dict[str, ClientUpdate]:
        """Ask ``clients`` to train from ``global_model`` (the round's seeds and the
        run's settings; ``local_epochs`` overrides the epochs); no aggregation, nothing
        recorded. ``task`` selects a client-side procedure other than plain training
        (e.g. ``"pga"``). Refused or failed replies are left out (and logged)."""
        ...

    def evaluate_local(self, model: TensorDict, clients: Sequence[str]) -> dict[str, float]:
        """Accuracy of ``model`` on each client's held-out data (no cost counted)."""
        ...


class ServerSideTask(Protocol):
    """What the server itself holds of the learning task, for methods that repair or
    distil on the server (FUKD): a fresh model to load tensors into and a proxy data set.

    fedforget's own task provides it (:class:`fedforget.measure.TaskServerSide`, from the
    run config's ``proxy-fraction``); a user's app may pass its own.
    """

    def new_model(self) -> Any:
        """A fresh ``torch.nn.Module`` of the run's architecture."""
        ...

    def proxy_data(self) -> Any:
        """The server's proxy data set (an :class:`fedforget.data.ArrayDataset`), or None
        when the server holds none."""
        ...


# ------------------------------------------------------------------------- results
@dataclass
class UnlearningResult:
    """The unlearned model and what it cost."""

    model: TensorDict
    cost: Cost
    rounds_affected: list[int]
    notes: list[str] = field(default_factory=list)
    history_dir: str | None = None  # a replayed history, for methods that write one


Observer = Callable[[int, Mapping[str, np.ndarray]], None]
"""Called as ``observe(server_round, model)`` with an intermediate global model."""


@dataclass(frozen=True)
class UnlearningRequest:
    """What to forget and from which history.

    ``observe``, when set, is handed each intermediate global model a method rebuilds
    (through :meth:`report`), labelled with its round: the replayed or recovered round
    :math:`t`; for a correction applied to :math:`\\theta_T` in one step, round :math:`T`;
    for follow-up rounds after it, :math:`T + i`. Rounds reported are strictly increasing.
    A method may go on using the arrays it hands over, so an observer that keeps a model
    keeps a copy; it should do nothing slower than that, since it runs inside the method's
    measured wall time. Methods that write a replayed history
    (``UnlearningResult.history_dir``) report nothing: their rounds are in that history.

    ``exclude`` names clients that must not be asked to train, beyond ``forget`` (the
    service fills it with every client withdrawn so far, so that a method forgetting one
    client per request never asks an earlier or a pending leaver). ``server_side``, when
    set, is what a server-side repair may use (:class:`ServerSideTask`).
    """

    store: HistoryStore
    forget: frozenset[str]
    federation: Federation
    workdir: str  # a fresh directory the method may write into
    current_model: TensorDict | None = None  # the model in service (after earlier unlearning)
    observe: Observer | None = None
    # records and labels forgotten beyond whole clients (every record and class request in
    # force); the clients leave them out of every round they train (fedforget.erasure)
    scope: ErasureScope = field(default_factory=ErasureScope)
    kind: str = "client"  # the size of the request served: client, records or class
    exclude: frozenset[str] = frozenset()
    server_side: ServerSideTask | None = None

    def report(self, server_round: int, model: Mapping[str, np.ndarray]) -> None:
        """Hand ``model``, the global model after ``server_round``, to the observer, if any.

        A method that must first build the model (a conversion, a copy) checks
        ``observe is not None`` before building it, so that nothing is spent unobserved.
        """
        if self.observe is not None:
            self.observe(server_round, model)


# ------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class MethodParams:
    """Base of each method's parameters: typed fields, validated, set by name."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Raise ConfigError for an out-of-range value (override)."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MethodParams:
        """Build from ``key=value`` settings (kebab- or snake-case); unknown keys refused."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                allowed = ", ".join(n.replace("_", "-") for n in known) or "none"
                raise ConfigError(f"unknown parameter {key!r}; allowed: {allowed}")
            default = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{key} = {value!r}: expected true or false")
            elif isinstance(default, int) and not isinstance(value, bool):
                if not isinstance(value, int | float) or float(value) != int(value):
                    raise ConfigError(f"{key} = {value!r}: expected an integer")
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{key} = {value!r}: expected a number")
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Parameters with kebab-case keys."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def check_range(name: str, value: float, *, low: float | None = None,
                high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is in the range."""
    ok = value == value  # not NaN
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        expected = " and ".join(p for p in (lo, hi) if p)
        raise ConfigError(f"{name} = {value!r} is out of range; expected {expected}")


P = TypeVar("P", bound=MethodParams)


class Unlearner(ABC, Generic[P]):
    """One unlearning method.

    Subclasses set ``name``, ``version``, ``exact`` (reproduces retraining bit for bit),
    ``multi_client`` (can forget several clients in one request) and ``Params``, and
    implement :meth:`run`.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    exact: ClassVar[bool] = False
    multi_client: ClassVar[bool] = True
    needs_clients: ClassVar[bool] = True
    # the sizes of request it serves (fedforget.erasure.KINDS)
    request_kinds: ClassVar[tuple[str, ...]] = ("client",)
    Params: ClassVar[type[MethodParams]] = MethodParams
    params: P

    def __init__(self, params: P | None = None) -> None:
        if params is None:
            params = self.Params()  # type: ignore[assignment]
        if not isinstance(params, self.Params):
            raise UnlearningError(
                f"{self.name} expects {self.Params.__name__}; got {type(params).__name__}"
            )
        self.params = params

    def uses_clients(self) -> bool:
        """Whether this method, with its parameters, asks the clients for work."""
        return self.needs_clients

    def check(self, request: UnlearningRequest) -> None:
        """Refuse a request this method cannot serve, before any work (override to add)."""
        if request.kind not in self.request_kinds:
            raise UnlearningError(
                f"{self.name} serves {', '.join(self.request_kinds)} requests; this is a "
                f"{request.kind} request (methods for every size: retrain, rollback)"
            )
        if not self.multi_client and len(request.forget) > 1:
            raise UnlearningError(
                f"{self.name} forgets one client per request; got {sorted(request.forget)}"
            )

    def unlearn(self, request: UnlearningRequest) -> UnlearningResult:
        """Check, run and time the method."""
        self.check(request)
        start = time.perf_counter()
        result = self.run(request)
        result.cost.server_seconds = time.perf_counter() - start
        return result

    @abstractmethod
    def run(self, request: UnlearningRequest) -> UnlearningResult:
        """Compute the unlearned model."""


METHOD_MODULES = (
    "retrain", "rollback", "federaser", "subtract", "fedrecovery", "fedrecover", "pga",
    "rapid_retrain", "fucp", "repair", "fastfedul", "sifu", "fukd", "crab",
)
"""The shipped method modules of :mod:`fedforget.unlearning`; each registers itself. A new
method is one module and one name here."""

METHODS: Registry[type[Unlearner[Any]]] = Registry(
    "unlearning method", builtins=tuple(f"fedforget.unlearning.{m}" for m in METHOD_MODULES)
)


def register(cls: type[Unlearner[Any]]) -> type[Unlearner[Any]]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    return METHODS.register(cls.name, cls)


def get_method(name: str, params: Mapping[str, Any] | None = None) -> Unlearner[Any]:
    """The registered method ``name`` with its parameters set from ``params``."""
    cls = METHODS.get(name)
    return cls(cls.Params.from_mapping(params or {}))


# ----------------------------------------------------------------------- helpers
def first_contribution(store: HistoryStore, clients: Iterable[str]) -> int | None:
    """The first round any of ``clients`` took part in (None if none ever did)."""
    firsts = [rounds[0] for c in set(clients) if (rounds := store.client_rounds(c))]
    return min(firsts) if firsts else None


def weighted_sum(
    terms: Iterable[tuple[float, Mapping[str, np.ndarray]]], like: Mapping[str, np.ndarray]
) -> TensorDict:
    """Σ w·x over tensor dicts, accumulated in float64, returned as ``like``'s dtypes."""
    acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in like.items()}
    for weight, tensors in terms:
        for k in acc:
            acc[k] += weight * tensors[k]
    return {k: acc[k].astype(like[k].dtype) for k in acc}


Progress = Callable[[int, int], None]

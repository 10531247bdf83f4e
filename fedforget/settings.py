"""fedforget's own keys in a Flower run config, and the recording settings of a run.

Every Flower app keeps its run config: fedforget never reads or refuses an app's keys. Its own
keys carry the prefix ``fedforget.`` (in a ``pyproject.toml``: ``fedforget.out-dir = "..."``
inside ``[tool.flwr.app.config]``, which Flower flattens to the key ``fedforget.out-dir``):

=========================  ===============================================================
key                        meaning
=========================  ===============================================================
``fedforget.out-dir``      the run directory (history, receipts, results)
``fedforget.mode``         ``train`` (default): train or resume; ``unlearn``: serve the
                           withdrawal request the CLI ordered (``fedforget unlearn``)
``fedforget.request-id``   (optional) which request to serve; default: the latest ordered
``fedforget.keys-dir``     (optional) the server's signing keys (default ``<out-dir>/keys``)
``fedforget.progress``     (optional) progress lines, ``true`` by default
``fedforget.reference``    (optional) ``compute`` (default), ``cached`` or ``none``: whether
                           an unlearning computes the retrained reference
``fedforget.reply-timeout``(optional) seconds a round waits for replies (default 300)
``fedforget.engine``       (optional) the engine's name in results (fedforget's CLI sets it)
``fedforget.withdrawal-    (optional) the method that serves the withdrawals clients ask for
method``, ``-params``      themselves, after the training rounds (default: record them only)
``fedforget.impact-        (optional) how many remaining clients (a sample seeded by the run
clients``                  seed) evaluate the original and unlearned models for the
                           per-client impact (default 100); 0: every one
``fedforget.shadow-        (optional) the shadow-model membership attack, where the app's
attack``                   measure runs one (fedforget's own task): ``on``, ``off``, or
                           ``auto`` (default): on unless ``reference`` is ``none`` (the
                           cheap mode trains no model to measure with)
``fedforget.node-auth``    (optional) ``true`` when the SuperLink authenticates SuperNodes:
                           each client id is pinned to the first node id claiming it, and
                           any other claimant refused (:mod:`fedforget.identity`)
=========================  ===============================================================

``flwr run`` accepts only keys the app declares, so an app declares the ones it uses
(``out-dir`` and ``mode`` at least); the in-process engine passes any.

:class:`RecordingSettings` are what makes a run reproducible and unlearnable: the seed that
drives client sampling and each client's training seed, the clients per round, the reply
policy, the retention and codec of the history. An app gives them in code
(``Unlearnable(strategy, context, seed=..., ...)``) or as ``fedforget.<key>`` run-config
keys (``fedforget.seed``, ``fedforget.clients-per-round``, ``fedforget.min-replies``,
``fedforget.retain-interval``, ``fedforget.codec``, ``fedforget.history-fsync``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedforget.errors import ConfigError

PREFIX = "fedforget."
MODES = ("train", "unlearn")
REFERENCE_POLICIES = ("compute", "cached", "none")
SHADOW_ATTACK = ("auto", "on", "off")
CODECS = ("fp32", "fp16", "bf16")
DEFAULT_REPLY_TIMEOUT = 300.0
DEFAULT_IMPACT_CLIENTS = 100
"""Remaining clients asked for the per-client impact by default (a seeded sample when the
federation has more; every client of a smaller one)."""
WEIGHTED_MEAN = "weighted-mean"
"""The ``aggregation`` a history records (next to its :class:`RecordingSettings`) when every
global model is the example-weighted mean of the clients' models (Flower's FedAvg and
FedProx); server-side methods may then read only what their update rule needs."""


def app_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The app's own keys of a Flower run config (everything but ``fedforget.*``)."""
    return {k: v for k, v in run_config.items() if not str(k).startswith(PREFIX)}


def fedforget_keys(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """fedforget's keys of a run config, without the prefix (``{"out-dir": ...}``)."""
    return {str(k)[len(PREFIX):]: v for k, v in run_config.items()
            if str(k).startswith(PREFIX)}


def _meta(kind: type, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, **extra}


@dataclass(frozen=True)
class RunSettings:
    """fedforget's operational keys of one ServerApp run (never part of the history)."""

    out_dir: str = ""
    mode: str = field(default="train", metadata=_meta(str, choices=MODES))
    request_id: str = ""
    keys_dir: str = ""
    progress: bool = True
    reference: str = field(default="compute", metadata=_meta(str, choices=REFERENCE_POLICIES))
    reply_timeout: float = field(default=DEFAULT_REPLY_TIMEOUT, metadata=_meta(float, low=0.01))
    engine: str = ""  # how the ServerApp is run, as results record it (set by fedforget's CLI)
    # the server's policy for withdrawals the clients ask for themselves: the method (and its
    # parameters, a JSON object) that serves them after the training rounds; "" = record only
    withdrawal_method: str = ""
    withdrawal_params: str = ""
    # the cost of measuring an unlearning at scale: per-client impact on a seeded sample of
    # the remaining clients (0: all), the shadow attack on or off
    impact_clients: int = field(default=DEFAULT_IMPACT_CLIENTS, metadata=_meta(int, low=0))
    shadow_attack: str = field(default="auto", metadata=_meta(str, choices=SHADOW_ATTACK))
    # the SuperLink authenticates SuperNodes (--enable-supernode-auth): node ids are bound to
    # registered keys, and each client id is pinned to the first node id claiming it
    node_auth: bool = False

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Read the ``fedforget.*`` operational keys; an unknown ``fedforget.*`` key that is
        neither operational nor a recording setting is refused."""
        own = fedforget_keys(run_config)
        known = {f.name.replace("_", "-") for f in fields(cls)}
        recording = {f.name.replace("_", "-") for f in fields(RecordingSettings)}
        unknown = sorted(set(own) - known - recording)
        if unknown:
            allowed = ", ".join(PREFIX + k for k in sorted(known | recording))
            raise ConfigError(f"unknown key {PREFIX + unknown[0]!r}; fedforget's keys are "
                              f"{allowed}")
        return cls(**_coerce_all(cls, {k: v for k, v in own.items() if k in known}))

    @property
    def run_dir(self) -> Path:
        """The run directory (``fedforget.out-dir``); an error if it is not set."""
        if not self.out_dir:
            raise ConfigError(
                "fedforget.out-dir is not set: give the run directory in the run config "
                "(e.g. --run-config \"fedforget.out-dir='runs/my-run'\")"
            )
        return Path(self.out_dir)

    def to_run_config(self) -> dict[str, Any]:
        """The non-default settings as ``fedforget.*`` run-config keys."""
        default = RunSettings()
        return {PREFIX + f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name) or f.name in ("out_dir",
                                                                                      "mode")}

    def withdrawal_policy(self) -> tuple[str, dict[str, Any]] | None:
        """The method and parameters that serve client-asked withdrawals, if any."""
        if not self.withdrawal_method:
            return None
        try:
            params = json.loads(self.withdrawal_params) if self.withdrawal_params else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{PREFIX}withdrawal-params = {self.withdrawal_params!r}: not a "
                              f"JSON object ({exc})") from None
        if not isinstance(params, dict):
            raise ConfigError(f"{PREFIX}withdrawal-params = {self.withdrawal_params!r}: "
                              "expected a JSON object")
        return self.withdrawal_method, params

    def wants_shadow_attack(self) -> bool:
        """Whether the membership attacks that train a model (the shadow attack and FedEraser's
        attack on the original model) run: ``on``; not ``off``; ``auto``: unless the
        reference is ``none``."""
        if self.shadow_attack == "auto":
            return self.reference != "none"
        return self.shadow_attack == "on"

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RecordingSettings:
    """How a run is sampled, seeded and recorded (the same for training and every replay).

    ``clients_per_round = 0`` takes the wrapped strategy's own fraction
    (``max(min_train_nodes, int(fraction_train * N))`` over the roster, as Flower's FedAvg
    counts), drawn by stable id with a generator seeded from ``seed``.
    """

    seed: int = field(default=0, metadata=_meta(int, low=0))
    clients_per_round: int = field(default=0, metadata=_meta(int, low=0))
    min_replies: int = field(default=1, metadata=_meta(int, low=1))
    retain_interval: int = field(default=1, metadata=_meta(int, low=1))
    codec: str = field(default="fp32", metadata=_meta(str, choices=CODECS))
    history_fsync: bool = True
    # robust aggregation (fedforget.robust): 0 turns a bound off
    max_update_norm: float = field(default=0.0, metadata=_meta(float, low=0.0))
    update_norm_policy: str = field(default="refuse",
                                    metadata=_meta(str, choices=("refuse", "clip")))
    max_examples_factor: float = field(default=0.0, metadata=_meta(float, low=0.0))
    num_examples_policy: str = field(default="refuse",
                                     metadata=_meta(str, choices=("refuse", "cap")))

    def __post_init__(self) -> None:
        _check(self)
        if 0 < self.max_examples_factor < 1:
            raise ConfigError(f"{PREFIX}max-examples-factor = {self.max_examples_factor!r} is "
                              "out of range; expected 0 (off) or >= 1")

    def robust_policy(self) -> Any:
        """The :class:`fedforget.robust.RobustPolicy` of these settings (None: no bound)."""
        from fedforget.robust import ExampleCap, NormBound, RobustPolicy

        norm = (NormBound(self.max_update_norm, self.update_norm_policy)  # type: ignore[arg-type]
                if self.max_update_norm > 0 else None)
        examples = (ExampleCap(self.max_examples_factor,
                               self.num_examples_policy)  # type: ignore[arg-type]
                    if self.max_examples_factor > 0 else None)
        return None if norm is None and examples is None else RobustPolicy(norm, examples)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any],
                        **given: Any) -> RecordingSettings:
        """Settings given in code (``given``, where not None) over ``fedforget.*`` keys
        over the defaults."""
        own = fedforget_keys(run_config)
        known = {f.name.replace("_", "-") for f in fields(cls)}
        values = _coerce_all(cls, {k: v for k, v in own.items() if k in known})
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys (as stored with the history)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def schedule(self) -> dict[str, Any]:
        """The settings that shape training (resuming or replaying with others would
        train differently): everything but ``history-fsync``."""
        return {k: v for k, v in self.to_dict().items() if k != "history-fsync"}


# ---------------------------------------------------------------------- helpers
def _coerce_all(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
    return {by_key[k].name: _coerce(PREFIX + k, by_key[k], v) for k, v in values.items()}


def _kind(f: dataclasses.Field[Any]) -> type:
    if "kind" in f.metadata:
        kind: type = f.metadata["kind"]
        return kind
    return {"bool": bool, "int": int, "float": float, "str": str}[str(f.type)]


def _coerce(key: str, f: dataclasses.Field[Any], value: Any) -> Any:
    kind = _kind(f)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected a string")
    return value


def _check(obj: object) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        key = PREFIX + f.name.replace("_", "-")
        value = getattr(obj, f.name)
        _coerce(key, f, value)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key} = {value!r} is not allowed; expected one of "
                              f"{', '.join(repr(c) for c in choices)}")
        low = f.metadata.get("low")
        if low is not None and not value >= low:
            raise ConfigError(f"{key} = {value!r} is out of range; expected >= {low:g}")

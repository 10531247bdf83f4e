"""Run configuration: one flat table of kebab-case keys, shared by every engine.

The same keys are fedforget's own app's Flower run config (``[tool.flwr.app.config]`` and
``flwr run --run-config``), the experiment files under ``simulations/`` and the
``RunConfig`` dataclass (snake_case attributes). fedforget's operational keys (run
directory, mode, ...) are not here: they are ``fedforget.*`` keys of any app's run config
(:mod:`fedforget.settings`). Every key is validated here, at the
boundary: an unknown key or a bad value raises :class:`~fedforget.errors.ConfigError`
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedforget.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "shard")
GROUP_SHIFTS = ("permute", "invert", "none")  # fedforget.data.groups
STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg")
CODECS = ("fp32", "fp16", "bf16")

# Keys that do not change the training itself: a run may be resumed with other values.
OPERATIONAL_KEYS = frozenset({"history-fsync"})
# Keys a resumed run may change (extending a finished run with more rounds).
EXTENDABLE_KEYS = ("num-rounds", "history-fsync")


def _choice(allowed: tuple[str, ...]) -> dict[str, Any]:
    return {"choices": allowed}


def _registered(module: str, registry: str) -> dict[str, Any]:
    """Allowed values = the keys of a registry, read when a value is checked, so that a
    data set or model registered after import (a plug-in) is accepted."""
    return {"registry": (module, registry)}


def _choices(f: dataclasses.Field[Any]) -> tuple[str, ...] | None:
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    if "registry" in f.metadata:
        import importlib

        module, registry = f.metadata["registry"]
        return tuple(getattr(importlib.import_module(module), registry))
    return None


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> dict[str, Any]:
    return {"range": (low, high, low_open, high_open)}


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything that defines a training run; one seed fixes all randomness.

    ``seed`` fixes model initialisation, client sampling and each client's data order
    in each round. Keys on the wire are the attribute names in kebab-case.
    """

    seed: int = field(default=0, metadata=_range(0))
    num_rounds: int = field(default=30, metadata=_range(1))
    num_clients: int = field(default=10, metadata=_range(1))
    # data
    dataset: str = field(
        default="digits", metadata=_registered("fedforget.data.datasets", "DATASETS")
    )
    data_path: str = ""
    test_fraction: float = field(default=0.2, metadata=_range(0, 1, low_open=True, high_open=True))
    partitioner: str = field(default="dirichlet", metadata=_choice(PARTITIONERS))
    dirichlet_alpha: float = field(default=0.5, metadata=_range(0, None, low_open=True))
    shards_per_client: int = field(default=2, metadata=_range(1))
    holdout_fraction: float = field(default=0.2, metadata=_range(0, 1, high_open=True))
    synthetic_samples: int = field(default=600, metadata=_range(10))
    synthetic_features: int = field(default=20, metadata=_range(1))
    synthetic_classes: int = field(default=4, metadata=_range(2))
    # model
    model: str = field(default="mlp", metadata=_registered("fedforget.models", "MODELS"))
    hidden_size: int = field(default=64, metadata=_range(1))
    # local training (sent to clients every round)
    local_epochs: int = field(default=1, metadata=_range(1))
    learning_rate: float = field(default=0.1, metadata=_range(0, None, low_open=True))
    batch_size: int = field(default=32, metadata=_range(1))
    # server strategy
    strategy: str = field(default="fedavg", metadata=_choice(STRATEGIES))
    proximal_mu: float = field(default=0.01, metadata=_range(0))
    trim_beta: float = field(default=0.2, metadata=_range(0, 0.5, high_open=True))
    sample_fraction: float = field(default=1.0, metadata=_range(0, 1, low_open=True))
    sample_count: int = field(default=0, metadata=_range(0))
    min_replies: int = field(default=1, metadata=_range(1))
    # robust aggregation (fedforget.robust): bound what one client's reply can do; 0 = off
    max_update_norm: float = field(default=0.0, metadata=_range(0))
    update_norm_policy: str = field(default="refuse", metadata=_choice(("refuse", "clip")))
    max_examples_factor: float = field(default=0.0, metadata=_range(0))
    num_examples_policy: str = field(default="refuse", metadata=_choice(("refuse", "cap")))
    # history
    retain_interval: int = field(default=1, metadata=_range(1))
    codec: str = field(default="fp32", metadata=_choice(CODECS))
    # true: each round is fsynced before it counts (survives power loss); false: atomic
    # against a killed process only, cheaper (for simulations that can be re-run)
    history_fsync: bool = True
    # experiment option: these clients train on data with a planted trigger
    backdoor_clients: str = ""  # comma-separated client ids, e.g. "client-003"
    backdoor_target: int = field(default=0, metadata=_range(0))
    backdoor_fraction: float = field(default=0.5, metadata=_range(0, 1, low_open=True))
    # experiment option: clients in groups (sizes in client order, e.g. "7,3"); group g >= 1
    # sees its inputs through a fixed transform, an "accent" (fedforget.data.groups)
    groups: str = ""
    group_shift: str = field(default="permute", metadata=_choice(GROUP_SHIFTS))

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_value(f, getattr(self, f.name))
        if self.groups:
            from fedforget.data.groups import parse_groups

            parse_groups(self.groups, self.num_clients)
        for cid in sorted(self.backdoor_client_ids()):
            match = re.fullmatch(r"client-(\d+)", cid)
            if match is None or int(match.group(1)) >= self.num_clients:
                raise ConfigError(
                    f"backdoor-clients names {cid!r}, which is not a client of this run; "
                    f"expected ids client-000..client-{self.num_clients - 1:03d}"
                )
        if self.sample_count > self.num_clients:
            raise ConfigError(
                f"sample-count = {self.sample_count} is larger than num-clients = "
                f"{self.num_clients}; expected 0 (use sample-fraction) or 1..{self.num_clients}"
            )
        if self.min_replies > self.num_clients:
            raise ConfigError(
                f"min-replies = {self.min_replies} is larger than num-clients = "
                f"{self.num_clients}; expected 1..{self.num_clients}"
            )

    # ------------------------------------------------------------------ conversion
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """All accepted keys, kebab-case."""
        return tuple(_kebab(f.name) for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case (or snake_case) keys; unknown keys are refused."""
        by_name = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise ConfigError(
                    f"unknown config key {key!r}; allowed keys: {', '.join(cls.keys())}"
                )
            kwargs[name] = _coerce(by_name[name], value)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys, every value a TOML/Flower scalar (int, float, str, bool)."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    def training_mapping(self) -> dict[str, Any]:
        """The keys that define the training (everything but operational settings)."""
        return {k: v for k, v in self.to_mapping().items() if k not in OPERATIONAL_KEYS}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some attributes changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def recording_settings(self) -> dict[str, Any]:
        """The keyword arguments of :class:`fedforget.strategies.unlearnable.Unlearnable`
        that this run config sets (seed, clients per round, reply policy, retention,
        codec, fsync)."""
        return {"seed": self.seed, "clients_per_round": self.clients_per_round(),
                "min_replies": self.min_replies, "retain_interval": self.retain_interval,
                "codec": self.codec, "history_fsync": self.history_fsync,
                "max_update_norm": self.max_update_norm,
                "update_norm_policy": self.update_norm_policy,
                "max_examples_factor": self.max_examples_factor,
                "num_examples_policy": self.num_examples_policy}

    def backdoor_client_ids(self) -> frozenset[str]:
        """The clients that plant a backdoor (experiment option)."""
        return frozenset(c.strip() for c in self.backdoor_clients.split(",") if c.strip())

    def group_sizes(self) -> tuple[int, ...]:
        """The sizes of the client groups (empty without groups)."""
        from fedforget.data.groups import parse_groups

        return parse_groups(self.groups, self.num_clients)

    def clients_per_round(self) -> int:
        """How many clients the sampler selects each round."""
        if self.sample_count:
            return self.sample_count
        return max(1, int(self.num_clients * self.sample_fraction + 1e-9))


def read_toml(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read a flat TOML file of run-config keys (as under ``simulations/``)."""
    path = Path(path)
    values = read_toml(path)
    if "experiment" in values:
        raise ConfigError(
            f"config file {str(path)!r} is an experiment file (it has an [experiment] table); "
            "run it with `fedforget run`, or give a flat run config"
        )
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"config file {str(path)!r}: table [{key}] is not supported; "
                "expected flat run-config keys"
            )
    values.update(overrides)
    return RunConfig.from_mapping(values)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (``--set``) with TOML value syntax, bare words as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------- helpers
def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    key = _kebab(f.name)
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                    "bool": bool}[str(f.type)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key} = {value!r}: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return int(as_float)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {value!r}: expected a number") from None
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected a string")
    return value


def _check_value(f: dataclasses.Field[Any], value: Any) -> None:
    key = _kebab(f.name)
    choices = _choices(f)
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key} = {value!r} is not allowed; expected one of {allowed}")
    if "range" in f.metadata:
        low, high, low_open, high_open = f.metadata["range"]
        bad = (
            (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))
        )
        if bad or value != value:  # NaN fails every comparison
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            expected = " and ".join(p for p in (lo, hi) if p)
            raise ConfigError(f"{key} = {value!r} is out of range; expected {expected}")

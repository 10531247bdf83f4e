"""An experiment file: a base run, a grid, seeds, who withdraws, and the methods to compare.

An experiment is a TOML file (see ``simulations/quickstart.toml``)::

    [experiment]
    name = "quickstart"              # names the results
    seeds = [0, 1, 2]                # one training run per seed and grid point
    forget = ["client-003"]          # who withdraws, in this order, after the last round
                                     # (when: a [grid] over num-rounds withdraws earlier)
    engine = "inprocess"             # or "simulation" (Flower's Ray engine)
    metrics = []                     # extra registered metrics (fedforget.evaluation.metrics)
    imports = []                     # modules imported first (plug-ins that register things)
    reference = "compute"            # the retrained reference: compute (once per forget set
                                     # and training run, shared by its methods), cached, none
    impact-clients = 100             # remaining clients (seeded sample) for the per-client
                                     # impact; 0: every one
    shadow-attack = "auto"           # the shadow-model membership attack: true, false, or
                                     # "auto" (unless reference = "none")

    [run]                            # the base run config: flat RunConfig keys
    dataset = "digits"
    num-rounds = 30

    [grid]                           # run-config keys -> lists of values (their product)
    dirichlet-alpha = [0.1, 0.5, 10.0]

    [methods.federaser]              # one table per method to compare, its parameters inside
    retain-interval = 2
    [methods.fedaccum]               # a label of its own for another method ...
    method = "subtract"              # ... named by ``method``

The cells are grid points × seeds × methods. Every (grid point, seed) is one training run,
shared by the methods of that point and seed; each method is one cell with one result.
Everything is checked here, before any work: unknown keys and bad values raise
:class:`~fedforget.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedforget.canonical import canonical_dumps
from fedforget.config import RunConfig, read_toml
from fedforget.errors import ConfigError
from fedforget.settings import DEFAULT_IMPACT_CLIENTS, REFERENCE_POLICIES

__all__ = ["Cell", "ExperimentSpec", "MethodSpec", "RunPoint", "load_experiment"]

_EXPERIMENT_KEYS = frozenset({"name", "description", "seeds", "forget", "engine", "metrics",
                              "imports", "reference", "impact-clients", "shadow-attack"})
_TABLES = frozenset({"experiment", "run", "grid", "methods"})
_LABEL = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# Keys the runner sets itself, per cell.
_RESERVED = frozenset({"seed"})


@dataclass(frozen=True)
class MethodSpec:
    """One method to compare: its label in the results, registry name and parameters."""

    label: str
    method: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class RunPoint:
    """One training run: a grid point and a seed."""

    grid: Mapping[str, Any]  # the grid values of this point (kebab-case keys)
    seed: int
    config: RunConfig  # the run config of fedforget's app

    @property
    def run_id(self) -> str:
        """A readable, file-safe id: ``alpha0.1-seed0`` style, or ``seed0`` with no grid."""
        parts = [f"{_short(k)}{_value_str(v)}" for k, v in self.grid.items()]
        return "-".join([*parts, f"seed{self.seed}"])


@dataclass(frozen=True)
class Cell:
    """One result: a method applied to one training run."""

    point: RunPoint
    method: MethodSpec

    @property
    def cell_id(self) -> str:
        """``<run id>-<method label>``."""
        return f"{self.point.run_id}-{self.method.label}"


@dataclass(frozen=True)
class ExperimentSpec:
    """A parsed, validated experiment file."""

    name: str
    description: str
    seeds: tuple[int, ...]
    forget: tuple[str, ...]
    engine: str
    base: Mapping[str, Any]
    grid: Mapping[str, tuple[Any, ...]]
    methods: tuple[MethodSpec, ...]
    metrics: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    reference: str = "compute"
    impact_clients: int = DEFAULT_IMPACT_CLIENTS
    shadow_attack: str = "auto"
    source: str = ""  # the file it was read from
    fingerprint: str = field(default="")  # SHA-256 of the canonical spec

    # ------------------------------------------------------------------ expansion
    def points(self) -> list[RunPoint]:
        """Every training run: the grid's product (in file order) × seeds."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            grid = dict(zip(keys, values, strict=True))
            for seed in self.seeds:
                cfg = RunConfig.from_mapping({**self.base, **grid, "seed": seed})
                out.append(RunPoint(grid=grid, seed=seed, config=cfg))
        return out

    def cells(self) -> list[Cell]:
        """Every cell: for each training run, each method."""
        return [Cell(point=p, method=m) for p in self.points() for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what the fingerprint is taken over)."""
        return {
            "name": self.name,
            "description": self.description,
            "seeds": list(self.seeds),
            "forget": list(self.forget),
            "engine": self.engine,
            "base": dict(self.base),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "methods": [{"label": m.label, "method": m.method, "params": dict(m.params)}
                        for m in self.methods],
            "metrics": list(self.metrics),
            "imports": list(self.imports),
            **self.measurement(),
        }

    def measurement(self) -> dict[str, Any]:
        """The settings that shape what a cell measures (and costs): reference policy,
        per-client impact sample, shadow attack (kebab-case keys)."""
        return {"reference": self.reference, "impact-clients": self.impact_clients,
                "shadow-attack": self.shadow_attack}


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Read and check an experiment file (see the module docstring for its format)."""
    doc = read_toml(path, what="experiment file")
    return parse_experiment(doc, source=str(path))


def parse_experiment(doc: Mapping[str, Any], *, source: str = "<experiment>") -> ExperimentSpec:
    """Check an experiment document (a parsed TOML mapping)."""
    where = f"experiment file {source!r}"
    unknown = sorted(set(doc) - _TABLES)
    if unknown:
        raise ConfigError(
            f"{where}: unknown table or key {unknown[0]!r}; expected the tables "
            f"{', '.join(sorted(_TABLES))}"
        )
    exp = _table(doc, "experiment", where)
    bad = sorted(set(exp) - _EXPERIMENT_KEYS)
    if bad:
        raise ConfigError(
            f"{where}: unknown key {bad[0]!r} in [experiment]; allowed keys: "
            f"{', '.join(sorted(_EXPERIMENT_KEYS))}"
        )
    name = exp.get("name", Path(source).stem)
    if not isinstance(name, str) or not _LABEL.match(name):
        raise ConfigError(f"{where}: [experiment] name = {name!r}; expected lowercase letters, "
                          "digits, '-' or '_'")
    imports = _str_list(exp.get("imports", []), "imports", where)
    for module in imports:  # plug-ins register their methods, data sets, metrics
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{where}: imports: cannot import {module!r}: {exc}") from None

    seeds = exp.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"{where}: [experiment] seeds = {seeds!r}; expected a non-empty list "
                          "of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: [experiment] seeds = {seeds!r} repeats a seed")
    forget = _str_list(exp.get("forget"), "forget", where, required=True)
    if len(set(forget)) != len(forget):
        raise ConfigError(f"{where}: [experiment] forget = {forget!r} names a client twice")
    engine = exp.get("engine", "inprocess")
    if engine not in ("inprocess", "simulation"):
        raise ConfigError(f"{where}: [experiment] engine = {engine!r}; expected 'inprocess' or "
                          "'simulation'")
    reference = exp.get("reference", "compute")
    if reference not in REFERENCE_POLICIES:
        raise ConfigError(f"{where}: [experiment] reference = {reference!r}; expected one of "
                          f"{', '.join(repr(r) for r in REFERENCE_POLICIES)}")
    impact = exp.get("impact-clients", DEFAULT_IMPACT_CLIENTS)
    if isinstance(impact, bool) or not isinstance(impact, int) or impact < 0:
        raise ConfigError(f"{where}: [experiment] impact-clients = {impact!r}; expected an "
                          "integer >= 0 (0: every remaining client)")
    shadow = exp.get("shadow-attack", "auto")
    if isinstance(shadow, bool):
        shadow = "on" if shadow else "off"
    if shadow not in ("auto", "on", "off"):
        raise ConfigError(f"{where}: [experiment] shadow-attack = {shadow!r}; expected true, "
                          "false or 'auto'")
    metrics = _str_list(exp.get("metrics", []), "metrics", where)
    from fedforget.experiments.metrics import METRICS

    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"{where}: [experiment] metrics: unknown metric {metric!r}; "
                              f"registered: {', '.join(sorted(METRICS)) or '(none)'}")
    if metrics and reference == "none":
        raise ConfigError(f"{where}: [experiment] metrics {metrics} compare with the retrained "
                          "reference; reference = 'none' computes none (use 'compute')")

    base = dict(_table(doc, "run", where))
    reserved = sorted(set(base) & _RESERVED)
    if reserved:
        key = reserved[0]
        raise ConfigError(f"{where}: [run] {key} is set by the runner per cell; "
                          + ("use [experiment] seeds" if key == "seed" else "remove it"))
    grid_doc = _table(doc, "grid", where)
    grid: dict[str, tuple[Any, ...]] = {}
    for key, values in grid_doc.items():
        if key in _RESERVED:
            raise ConfigError(f"{where}: [grid] {key} cannot be varied here"
                              + ("; use [experiment] seeds" if key == "seed" else ""))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [grid] {key} = {values!r}; expected a non-empty list "
                              "of values")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: [grid] {key} = {values!r} repeats a value")
        grid[key] = tuple(values)
    # Every combination must make a valid run config: check them all now.
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        try:
            cfg = RunConfig.from_mapping({**base, **point})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        clients = {f"client-{i:03d}" for i in range(cfg.num_clients)}
        missing = [c for c in forget if c not in clients]
        if missing:
            raise ConfigError(
                f"{where}: [experiment] forget names {missing[0]!r}, which is not a client of "
                f"a run with num-clients = {cfg.num_clients} (client-000 .. "
                f"client-{cfg.num_clients - 1:03d})"
            )
        if len(forget) >= cfg.num_clients:
            raise ConfigError(f"{where}: [experiment] forget names every client; at least one "
                              "must remain")

    methods = _methods(_table(doc, "methods", where, required=True), where)
    spec = ExperimentSpec(
        name=name, description=str(exp.get("description", "")), seeds=tuple(seeds),
        forget=tuple(forget), engine=engine, base=base, grid=grid, methods=methods,
        metrics=tuple(metrics), imports=tuple(imports), reference=reference,
        impact_clients=impact, shadow_attack=shadow, source=source,
    )
    return dataclasses.replace(
        spec, fingerprint=hashlib.sha256(canonical_dumps(spec.to_dict())).hexdigest()
    )


def _methods(table: Mapping[str, Any], where: str) -> tuple[MethodSpec, ...]:
    from fedforget.unlearning import get_method

    if not table:
        raise ConfigError(f"{where}: [methods] is empty; expected at least one method table, "
                          "e.g. [methods.retrain]")
    out = []
    for label, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: methods.{label} = {body!r}; expected a table "
                              f"[methods.{label}]")
        if not _LABEL.match(label):
            raise ConfigError(f"{where}: [methods.{label}]: expected a label of lowercase "
                              "letters, digits, '-' or '_'")
        params = dict(body)
        method = params.pop("method", label)
        try:
            unlearner = get_method(method, params)
        except ConfigError as exc:
            raise ConfigError(f"{where}: [methods.{label}]: {exc}") from None
        out.append(MethodSpec(label=label, method=unlearner.name,
                              params=unlearner.params.to_dict()))
    return tuple(out)


def _table(doc: Mapping[str, Any], name: str, where: str, *, required: bool = False
           ) -> Mapping[str, Any]:
    value = doc.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{where}: the table [{name}] is missing")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} = {value!r}; expected a table [{name}]")
    return value


def _str_list(value: Any, key: str, where: str, *, required: bool = False) -> list[str]:
    if value is None and required:
        raise ConfigError(f"{where}: [experiment] {key} is missing; expected a list of client "
                          'ids, e.g. ["client-003"]')
    if not isinstance(value, list) or any(not isinstance(v, str) or not v for v in value) or (
            required and not value):
        raise ConfigError(f"{where}: [experiment] {key} = {value!r}; expected a "
                          f"{'non-empty ' if required else ''}list of strings")
    return list(value)


_SHORT = {"dirichlet-alpha": "alpha", "num-clients": "clients", "num-rounds": "rounds",
          "local-epochs": "epochs", "learning-rate": "lr", "sample-fraction": "frac"}


def _short(key: str) -> str:
    return _SHORT.get(key, key.replace("-", ""))


def _value_str(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)

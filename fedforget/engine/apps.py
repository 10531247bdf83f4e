"""Find and load the Flower app (ServerApp, ClientApp) of a project directory.

fedforget's ServerApp and ClientApp live in the project's ``server/`` and ``clients/``
folders, named in ``pyproject.toml`` under ``[tool.flwr.app.components]``; they are loaded
from the project root, exactly as Flower loads them from a FAB. The library never imports
them statically (dependencies point from the apps to the library).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedforget.errors import ConfigError
from fedforget.fileio import storage_error


@dataclass(frozen=True)
class FlowerProject:
    """A Flower app project: its root, its components and its default run config."""

    root: Path
    serverapp_ref: str
    clientapp_ref: str
    default_config: dict[str, Any]

    def run_config_defaults(self) -> dict[str, Any]:
        """The app's default run config, flat (``fedforget.out-dir``, not nested)."""
        from flwr.common.config import flatten_dict

        return dict(flatten_dict(self.default_config))

    def app_keys(self) -> frozenset[str]:
        """The app's own run-config keys (every default but ``fedforget.*``)."""
        from fedforget.settings import app_run_config

        return frozenset(app_run_config(self.run_config_defaults()))

    def load(self) -> tuple[ServerApp, ClientApp]:
        """Import and return the (ServerApp, ClientApp) objects."""
        root = str(self.root)
        if root not in sys.path:
            sys.path.insert(0, root)
        server = _load_ref(self.serverapp_ref, ServerApp)
        client = _load_ref(self.clientapp_ref, ClientApp)
        return server, client


def _candidates(app_dir: str | Path | None) -> list[Path]:
    if app_dir is not None:
        return [Path(app_dir)]
    candidates: list[Path] = []
    if os.environ.get("FEDFORGET_APP_DIR"):
        candidates.append(Path(os.environ["FEDFORGET_APP_DIR"]))
    candidates.append(Path.cwd())
    candidates.append(Path(__file__).resolve().parents[2])
    return candidates


def find_project(app_dir: str | Path | None = None) -> FlowerProject:
    """Locate the project: ``app_dir``, else ``$FEDFORGET_APP_DIR``, else the working
    directory, else the source tree this package was installed from (editable install)."""
    candidates = _candidates(app_dir)
    for cand in candidates:
        project = _read_project(cand)
        if project is not None:
            return project
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"no Flower app project found (tried {tried}); expected a directory whose "
        "pyproject.toml has [tool.flwr.app.components] (the fedforget repository root), "
        "given with --app DIR"
    )


def find_run_app(run_keys: Iterable[str], app_dir: str | Path | None = None
                 ) -> FlowerProject | None:
    """The app that recorded a run whose stored run config has the keys ``run_keys``.

    An app is recognised by its run-config keys (its ``[tool.flwr.app.config]`` defaults
    minus ``fedforget.*``), which the history stores with every run. Looks where
    :func:`find_project` looks; an ``app_dir`` given that holds another app is an error,
    and None is returned when no candidate is the run's app.
    """
    wanted = frozenset(run_keys)
    for cand in _candidates(app_dir):
        project = _read_project(cand)
        if project is None:
            if app_dir is not None:
                raise ConfigError(f"--app {str(app_dir)!r}: no pyproject.toml with "
                                  "[tool.flwr.app.components] there")
            continue
        if project.app_keys() == wanted:
            return project
        if app_dir is not None:
            extra = sorted(project.app_keys() - wanted)
            missing = sorted(wanted - project.app_keys())
            raise ConfigError(
                f"the app in {str(app_dir)!r} is not the app that recorded this run: its "
                f"run-config keys differ (the app has {extra or 'no'} more, lacks "
                f"{missing or 'none'})"
            )
    return None


def _read_project(root: Path) -> FlowerProject | None:
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    with pyproject.open("rb") as fh:
        data = tomllib.load(fh)
    app = data.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    if "serverapp" not in components or "clientapp" not in components:
        return None
    return FlowerProject(
        root=root.resolve(),
        serverapp_ref=components["serverapp"],
        clientapp_ref=components["clientapp"],
        default_config=dict(app.get("config", {})),
    )


def _load_ref(ref: str, kind: type) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import Flower component {ref!r}: {exc}") from exc
    obj = getattr(module, attr, None)
    if not isinstance(obj, kind):
        raise ConfigError(f"Flower component {ref!r} is not a {kind.__name__}")
    return obj


def stage_app(root: Path, directory: Path) -> Path:
    """The files of the Flower app at ``root`` that ``flwr run`` may package, linked (or
    copied) into the new directory ``directory``, which is returned: ``flwr run
    <directory>`` then builds the same FAB as ``flwr run <root>``, without walking what it
    would leave out.

    ``flwr run`` collects every file under the app's directory (resolving each path) before
    it filters them: under a project whose virtual environment lies inside it (``.venv``,
    about 50,000 files) that walk alone took 5.4 s, and the filtering 0.6 s more, of every
    submission. Here a directory is not entered when an exclusion that Flower applies to
    every file it collects (the root's ``.gitignore``, Flower's publish exclusions) already
    excludes the directory, hence, for a spec without negations (``!``), everything in it;
    every other file is staged, and Flower's own filters then run on the stage as they
    would on the root. Symbolic links and paths that resolve outside ``root`` are skipped,
    as Flower skips them.
    """
    root = root.resolve()
    specs = _exclusion_specs(root)
    try:
        directory.mkdir(parents=True)
    except OSError as exc:
        raise storage_error(exc, directory, "stage the Flower app in",
                            "nothing was submitted") from exc
    try:
        _stage(root, directory, specs)
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise storage_error(exc, directory, "stage the Flower app in",
                            "nothing was submitted and the stage was removed") from exc
    return directory


def _stage(root: Path, directory: Path, specs: list[Any]) -> None:
    """The walk of :func:`stage_app`."""
    for current, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(current)
        relative = here.relative_to(root)
        dirnames[:] = sorted(
            name for name in dirnames
            if not any(spec.match_file((relative / name).as_posix() + "/") for spec in specs)
        )
        for name in filenames:
            path = here / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            target = directory / relative / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:  # another file system, or no hard links: a copy
                shutil.copy2(path, target)


def _exclusion_specs(root: Path) -> list[Any]:
    """Path specs of the exclusions ``flwr run`` applies to every collected file, as
    Flower builds them; those with a negation (``!``) are left out (they can re-include a
    file inside an excluded directory). Empty where Flower's helpers are not found."""
    try:
        from flwr.cli.utils import build_pathspec, load_gitignore_patterns
        from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS
    except ImportError:  # pragma: no cover - another Flower: walk everything
        return []
    gitignore = root / ".gitignore"
    pattern_sets = [
        tuple(load_gitignore_patterns(gitignore)) if gitignore.is_file() else (),
        tuple(APP_PUBLISH_EXCLUDE_PATTERNS),
    ]
    return [build_pathspec(patterns) for patterns in pattern_sets
            if patterns and not any(p.lstrip().startswith("!") for p in patterns)]

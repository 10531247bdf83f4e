"""Packaging: only the name ``fedforget`` is installed; the design card's top-level folders
(strategies/, clients/, server/) are installed under it by a path mapping."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"fedforget.strategies": "strategies", "fedforget.clients": "clients",
          "fedforget.server": "server"}


def _setuptools() -> dict:  # type: ignore[type-arg]
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["tool"]["setuptools"]


def test_every_package_of_the_tree_is_listed_and_the_folders_are_mapped() -> None:
    # Prepare: every folder with an __init__.py, named as it installs
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "fedforget").rglob("__init__.py")}
    found |= set(MAPPED)
    # Execute
    config = _setuptools()
    # Assert
    assert set(config["packages"]) == found
    assert config["package-dir"] == MAPPED


@pytest.mark.slow
def test_the_wheel_installs_nothing_but_fedforget(tmp_path: Path) -> None:
    # Execute: build the wheel as pip would
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("fedforget-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Assert: one top-level package, the mapped folders inside it
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedforget"}
    for module in ("fedforget/strategies/history.py", "fedforget/strategies/unlearnable.py",
                   "fedforget/clients/mod.py", "fedforget/server/app.py",
                   "fedforget/flower.py", "fedforget/service.py"):
        assert module in names

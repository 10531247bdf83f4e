"""stage_app: the files `flwr run` packages, staged so that Flower does not walk a virtual
environment inside the project; the FAB built from the stage is the FAB built from the
project root, byte for byte."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedforget.engine.apps import stage_app
from fedforget.fileio import StorageError

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stageapp"
version = "1.0.0"
dependencies = ["flwr>=1.41"]

[tool.flwr.app]
publisher = "fedforget"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "clients.app:app"

[tool.flwr.app.config]
num-rounds = 3
"""


def _project(root: Path, gitignore: str) -> Path:
    files = {
        "pyproject.toml": PYPROJECT,
        ".gitignore": gitignore,
        "README.md": "# app\n",
        "server/app.py": "app = None\n",
        "clients/app.py": "app = None\n",
        "clients/conf.json": "{}\n",
        "clients/data.bin": "not packaged\n",
        "clients/__pycache__/app.cpython-311.pyc": "bytecode",
        "deep/er/still/mod.py": "x = 1\n",
        ".venv/lib/site.py": "venv = 1\n",
        ".venv/lib/pkg/meta.json": "{}\n",
        "runs/r1/notes.md": "# a run\n",
        "runs/keep.py": "kept = 1\n",
        "pkg.egg-info/PKG-INFO.md": "# egg\n",
        "build/lib/x.py": "x = 2\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "outside.py").write_text("y = 1\n")
    os.symlink(root / "outside.py", root / "clients" / "linked.py")
    return root


@pytest.mark.parametrize("gitignore", [
    ".venv/\nruns/\n*.egg-info/\nbuild/\n",
    "runs/\n!runs/keep.py\n",  # a negation: the .gitignore prunes nothing
    "",
], ids=["ignored-dirs", "negation", "no-gitignore"])
def test_the_staged_app_builds_the_same_fab(tmp_path: Path, gitignore: str) -> None:
    # Prepare
    root = _project(tmp_path / "project", gitignore)
    if not gitignore:
        (root / ".gitignore").unlink()
    # Execute
    staged = stage_app(root, tmp_path / "stage")
    # Assert: Flower's own build gives the same bytes from both directories
    assert build_fab_from_disk(staged) == build_fab_from_disk(root)
    # ... without the excluded directories having been staged (nor entered)
    assert not (staged / ".venv").exists()  # Flower's publish exclusions
    assert not (staged / "clients" / "__pycache__").exists()
    if gitignore.startswith(".venv"):
        assert not (staged / "runs").exists() and not (staged / "build").exists()
    elif gitignore.startswith("runs"):
        assert (staged / "runs" / "keep.py").is_file()
    assert (staged / "deep" / "er" / "still" / "mod.py").read_text() == "x = 1\n"
    assert not (staged / "clients" / "linked.py").exists()  # symbolic links skipped


def test_the_stage_must_be_a_new_directory(tmp_path: Path) -> None:
    root = _project(tmp_path / "project", "")
    (tmp_path / "stage").mkdir()
    with pytest.raises(StorageError, match=re.escape(
            f"cannot stage the Flower app in {tmp_path / 'stage'}: ")):
        stage_app(root, tmp_path / "stage")


def test_a_failed_stage_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a disk that fills up after the first file
    import errno

    from fedforget.engine import apps

    root = _project(tmp_path / "project", "")
    staged: list[str] = []

    def link(source: Path, target: Path) -> None:
        if staged:
            raise OSError(errno.ENOSPC, "No space left on device")
        staged.append(str(target))
        os.symlink(source, target)

    monkeypatch.setattr(apps.os, "link", link)
    monkeypatch.setattr(apps.shutil, "copy2", link)
    # Execute / Assert: a clear error, nothing left behind
    with pytest.raises(StorageError, match=re.escape("free some space")) as caught:
        stage_app(root, tmp_path / "stage")
    assert "nothing was submitted and the stage was removed" in str(caught.value)
    assert len(staged) == 1 and not (tmp_path / "stage").exists()

"""write_atomic: the old content or the new, never a part, and no temporary file left."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedforget.fileio import write_atomic


def test_write_atomic_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "sub" / "a.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.txt"
    write_atomic(path, "old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("fedforget.fileio.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]

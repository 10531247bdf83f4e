"""A full disk and a read-only file system are clear FedForgetErrors naming the file, and
leave nothing half-written. The real cases run in a private mount namespace (a small
tmpfs, a read-only bind mount) when the machine allows it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from fedforget.errors import FedForgetError
from fedforget.fileio import StorageError, write_atomic, write_new
from fedforget.history import HistoryStore, ParticipantUpdate


def namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m needs CAP_SYS_ADMIN)")
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{sys.executable} {tmp_path / 'script.py'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_write_atomic_on_a_full_disk_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "current.json"
    write_atomic(path, "old")
    real_open = open

    def full(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "w" in mode and ".tmp-" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(StorageError) as info:
        write_atomic(path, "new")
    monkeypatch.undo()
    assert str(info.value) == (f"cannot write {path}: no space left on device (free some space "
                               "and run the command again); its old content is unchanged")
    assert isinstance(info.value, FedForgetError) and isinstance(info.value, OSError)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json"]


def test_write_new_refuses_to_replace_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_new(tmp_path / "a", b"1")
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "a", b"2")

    def read_only(*args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("fedforget.fileio.os.link", read_only)
    with pytest.raises(StorageError, match=r"cannot write .*/b: read-only file system"):
        write_new(tmp_path / "b", b"2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_pack_write_on_a_full_disk_leaves_the_store_at_its_last_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = HistoryStore.create(tmp_path / "run", run_config={})
    theta0 = store.put_initial_model({"w": np.zeros(4, np.float32)})
    real_open = open

    def full(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if mode == "xb":
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(StorageError, match=r"cannot write the blobs of round 1 to .*\.pack: no "
                       r"space left on device .*; the store is unchanged at round 0"):
        store.commit_round(round=1, global_before=theta0, global_after={"w": np.ones(4, "f4")},
                           participants=[ParticipantUpdate("c", 1, 1.0, 0,
                                                           {"w": np.ones(4, "f4")})], config={})
    monkeypatch.undo()
    assert store.last_round == 0
    assert list((tmp_path / "run" / "blobs").iterdir()) == [
        p for p in (tmp_path / "run" / "blobs").iterdir() if p.name.startswith("000000-")]
    store.close()


def test_a_real_full_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    done = namespace(f"""
        import subprocess, numpy as np
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", "{disk}"],
                       check=True)
        from fedforget.fileio import StorageError
        from fedforget.history import HistoryStore, ParticipantUpdate, verify_store
        store = HistoryStore.create("{disk}/run", run_config={{}})
        before = store.put_initial_model({{"w": np.zeros(4000, np.float32)}})
        t = 0
        try:
            while True:
                t += 1
                model = {{"w": np.full(4000, t, np.float32)}}
                before = store.commit_round(round=t, global_before=before, global_after=model,
                    participants=[ParticipantUpdate("c", 1, 1.0, 0, model)], config={{}}
                ).global_after
        except StorageError as exc:
            print("refused:", exc)
        store.close()
        with HistoryStore.open("{disk}/run", read_only=True) as again:
            print("rounds", again.last_round, "of", t)
        report = verify_store("{disk}/run")
        print("verify", report.ok, report.problems)
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: cannot ") and "no space left on device" in lines[0]
    rounds, of = int(lines[1].split()[1]), int(lines[1].split()[3])
    assert rounds == of - 1  # every round but the refused one
    assert lines[2] == "verify True []"


def test_a_read_only_file_system(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with HistoryStore.create(run, run_config={}) as store:
        store.put_initial_model({"w": np.zeros(4, np.float32)})
    ro = tmp_path / "ro"
    ro.mkdir()
    done = namespace(f"""
        import subprocess
        subprocess.run(["mount", "--bind", "{run}", "{ro}"], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", "{ro}"], check=True)
        from fedforget.errors import FedForgetError
        from fedforget.history import HistoryStore
        from fedforget.lock import run_lock
        with HistoryStore.open("{ro}", read_only=True) as store:
            print("read-only open", store.last_round)
        for what in (lambda: HistoryStore.open("{ro}"),
                     lambda: run_lock("{ro}", command="t").__enter__()):
            try:
                what()
            except FedForgetError as exc:
                print("refused:", exc)
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "read-only open 0"
    assert lines[1].startswith(f"refused: cannot open {ro}/history.sqlite for writing")
    assert lines[2].startswith(f"refused: cannot create the lock file {ro}/fedforget.lock: "
                               "read-only file system")

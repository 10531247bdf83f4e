"""BlobViews: zero-copy, digest-checked reads of stored blobs."""

from __future__ import annotations

import gc
import mmap
import os
import re
import weakref
from pathlib import Path

import numpy as np
import pytest

from fedforget.errors import ConfigError, IntegrityError
from fedforget.history import HistoryStore
from fedforget.history import mappings as mappings_module
from fedforget.history import views as views_module
from fedforget.history.views import MAP_THRESHOLD, BlobViews, forget_verified
from fedforget.tensors import blob_layout, decode, encode


def _store(path: Path, tensors: dict[str, np.ndarray]) -> tuple[HistoryStore, str]:
    store = HistoryStore.create(path, run_config={}, fsync=False)
    return store, store.put_initial_model(tensors)


BIG = {"w": np.arange(MAP_THRESHOLD // 4 + 5, dtype=np.float32) / 7,
       "n": np.array([3, 4], dtype=np.int64)}
SMALL = {"w": np.array([1.5, -2.0], dtype=np.float32), "n": np.array([9], dtype=np.int64)}


@pytest.mark.parametrize("tensors", [BIG, SMALL], ids=["mapped", "read"])
def test_views_are_the_decoded_values(tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    # Prepare
    store, digest = _store(tmp_path / "run", tensors)
    with store, BlobViews(store) as views:
        # Execute
        blob = views.open(digest, "initial model")
        got = blob.views()
        views.check()
        # Assert: same values as decode, read-only, no copy of the blob's bytes
        expected = decode(encode(tensors))
        assert list(got) == list(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype and not got[k].flags.writeable
            assert not got[k].flags.owndata
        assert views.bytes_read == store.blob_location(digest).nbytes
        del got


@pytest.mark.parametrize("tensors", [BIG, SMALL], ids=["mapped", "read"])
def test_an_altered_blob_is_refused(tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    # Prepare: one byte of the last tensor changed in the pack file
    store, digest = _store(tmp_path / "run", tensors)
    location = store.blob_location(digest)
    with open(location.path, "r+b") as f:
        f.seek(location.offset + location.nbytes - 1)
        byte = f.read(1)
        f.seek(location.offset + location.nbytes - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    forget_verified()
    message = f"initial model: blob {location} is altered: its SHA-256 is sha256:"
    # Execute / Assert: the error names the blob, the file, the digests
    with store, BlobViews(store) as views, pytest.raises(IntegrityError,
                                                          match=re.escape(message)):
        views.open(digest, "initial model")
        views.check()


def test_once_a_blob_is_verified_an_altered_file_is_still_caught(tmp_path: Path) -> None:
    # Prepare: a first read verifies the blob (and remembers it) ...
    store, digest = _store(tmp_path / "run", BIG)
    with store:
        with BlobViews(store) as views:
            views.open(digest, "initial model")
            views.check()
        location = store.blob_location(digest)
        # ... then the pack is written to (its status-change time moves)
        stat = os.stat(location.path)
        with open(location.path, "r+b") as f:
            f.seek(location.offset + location.nbytes - 1)
            f.write(b"\x01")  # was 0x00: the top byte of the int64 4
        os.utime(location.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime restored
        # Execute / Assert
        with BlobViews(store) as views, pytest.raises(IntegrityError, match="is altered"):
            views.open(digest, "initial model")
            views.check()


def test_verify_once_skips_the_hash_of_an_unchanged_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views_module, "SETTLED_SECONDS", 0.0)  # the pack was just written
    store, digest = _store(tmp_path / "run", BIG)
    forget_verified()
    with store:
        with BlobViews(store) as views:
            views.open(digest, "initial model")
            views.check()
            assert views.bytes_hashed == views.bytes_read
        with BlobViews(store) as views:
            views.open(digest, "initial model")
            views.check()
            assert views.bytes_hashed == 0
        with BlobViews(store, verify="always") as views:
            views.open(digest, "initial model")
            views.check()
            assert views.bytes_hashed == views.bytes_read


def test_a_truncated_pack_is_refused(tmp_path: Path) -> None:
    store, digest = _store(tmp_path / "run", BIG)
    location = store.blob_location(digest)
    os.truncate(location.path, location.offset + location.nbytes - 10)
    with store, BlobViews(store) as views, pytest.raises(IntegrityError, match=re.escape(
            f"initial model: blob {location} is truncated: {location.nbytes - 10} of "
            f"{location.nbytes} bytes present")):
        views.open(digest, "initial model")


def test_a_missing_pack_is_refused(tmp_path: Path) -> None:
    store, digest = _store(tmp_path / "run", SMALL)
    location = store.blob_location(digest)
    os.unlink(location.path)
    with store, BlobViews(store) as views, pytest.raises(IntegrityError, match=re.escape(
            f"initial model: blob {location} is missing: the file does not exist")):
        views.open(digest, "initial model")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    store, _ = _store(tmp_path / "run", SMALL)
    with store:
        with pytest.raises(ConfigError, match=re.escape(
                "verify = 'never'; expected one of once, always")):
            BlobViews(store, verify="never")
        with pytest.raises(ConfigError, match=re.escape("workers = 0; expected an integer")):
            BlobViews(store, workers=0)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
def test_layout_agrees_with_decode(codec: str) -> None:
    # Prepare
    tensors = {"a": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4),
               "i": np.array([1, 2, 3], dtype=np.int32)}
    blob = encode(tensors, codec)
    # Execute
    found, layout = blob_layout(blob)
    # Assert: names, shapes, offsets; the views widen to what decode returns
    decoded = decode(blob)
    assert found == codec
    assert [(t.name, t.shape) for t in layout] == [("a", (3, 4)), ("i", (3,))]
    assert layout[-1].offset + layout[-1].nbytes == len(blob)
    a = layout[0].view(blob)
    if codec == "bf16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(a.astype(np.float32), decoded["a"])
    np.testing.assert_array_equal(layout[1].view(blob), decoded["i"])


def test_layout_refuses_what_decode_refuses() -> None:
    blob = encode({"a": np.zeros(3, np.float32)})
    with pytest.raises(IntegrityError, match="truncated tensor blob"):
        blob_layout(blob[:-1])
    with pytest.raises(IntegrityError, match="trailing bytes"):
        blob_layout(blob + b"\x00")
    with pytest.raises(IntegrityError, match="not an encoded tensor dict"):
        blob_layout(b"nonsense" + blob)


def _two_big_blobs(path: Path) -> tuple[HistoryStore, list[str]]:
    store = HistoryStore.create(path, run_config={}, fsync=False)
    first = store.put_initial_model(BIG)
    record = store.commit_round(
        round=1, global_before=first, global_after={k: v + 1 for k, v in BIG.items()},
        participants=[], config={})
    return store, [first, record.global_after]


def test_a_mapping_is_kept_for_the_next_reader_and_dropped_when_its_file_changes(
        tmp_path: Path) -> None:
    # Prepare
    store, (digest, _) = _two_big_blobs(tmp_path / "run")
    with store:
        with BlobViews(store) as views:
            first = views.open(digest, "initial model")
            views.check()
            mapping = first._mapping
        # Execute: a second reader of the same blob
        with BlobViews(store) as views:
            again = views.open(digest, "initial model")
            # Assert: the same mapping, still open after the first reader released it
            assert again._mapping is mapping and not mapping.closed
            np.testing.assert_array_equal(again.views()["w"], BIG["w"])
            views.check()
        # Execute: the pack is written to (its identity changes)
        location = store.blob_location(digest)
        with open(location.path, "r+b") as f:
            f.seek(location.offset + location.nbytes - 1)
            f.write(b"\x01")
        forget_verified()
        with BlobViews(store) as views, pytest.raises(IntegrityError, match="is altered"):
            fresh = views.open(digest, "initial model")
            # Assert: a new mapping replaced the kept one, which is unmapped
            assert fresh._mapping is not mapping and mapping.closed
            views.check()


def test_closing_the_store_unmaps_its_blobs(tmp_path: Path) -> None:
    # Prepare: the blobs of two stores (the same blobs: the same digests) mapped; weak
    # references, since a mapping object that is gone is unmapped
    store, _ = _two_big_blobs(tmp_path / "a")
    other, digests = _two_big_blobs(tmp_path / "b")
    mappings: dict[str, list[weakref.ref[mmap.mmap]]] = {"a": [], "b": []}
    for name, s in (("a", store), ("b", other)):
        with BlobViews(s) as views:
            for d in digests:
                mappings[name].append(weakref.ref(views.open(d, "model")._mapping))
            views.check()
    gc.collect()
    assert all(ref() is not None for refs in mappings.values() for ref in refs)
    # Execute
    store.close()
    gc.collect()
    # Assert: the closed store's mappings are gone, the other store's are kept
    assert all(ref() is None for ref in mappings["a"])
    assert all(ref() is not None for ref in mappings["b"])
    assert not any(k[0].startswith(str(tmp_path / "a")) for k in mappings_module._mappings)
    other.close()
    gc.collect()
    assert all(ref() is None for ref in mappings["b"])


def test_the_kept_mappings_stay_within_their_budget(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: room for one blob's mapping only
    store, (first, second) = _two_big_blobs(tmp_path / "run")
    monkeypatch.setattr(mappings_module, "MAPPING_CACHE_BYTES",
                        store.blob_location(first).nbytes + (1 << 16))
    with store, BlobViews(store) as views:
        # Execute: the first blob still viewed while the second is mapped
        a = views.open(first, "initial model")
        values = a.views()["w"]
        b = views.open(second, "round 1")
        # Assert: the first was dropped from the kept ones but stays readable while viewed
        kept = [m for _, m in mappings_module._mappings.values()]
        assert b._mapping in kept and a._mapping not in kept
        assert mappings_module._mapped_bytes <= mappings_module.MAPPING_CACHE_BYTES
        np.testing.assert_array_equal(values, BIG["w"])
        views.check()
        del values


def test_no_mapping_is_kept_with_a_zero_budget(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mappings_module, "MAPPING_CACHE_BYTES", 0)
    store, (digest, _) = _two_big_blobs(tmp_path / "run")
    with store:
        with BlobViews(store) as views:
            blob = views.open(digest, "initial model")
            views.check()
        assert blob._mapping is None or blob._mapping.closed
        assert not any(k[0].startswith(str(tmp_path)) for k in mappings_module._mappings)


def test_the_kept_mappings_are_bounded_in_number(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: room for one mapping by count (each holds a file descriptor)
    monkeypatch.setattr(mappings_module, "MAPPING_CACHE_COUNT", 1)
    store, (first, second) = _two_big_blobs(tmp_path / "run")
    with store, BlobViews(store) as views:
        # Execute
        a = views.open(first, "initial model")
        b = views.open(second, "round 1")
        views.check()
        # Assert: only the newer one is kept
        kept = [m for _, m in mappings_module._mappings.values()]
        assert kept == [b._mapping] and a._mapping not in kept

"""cache.py: entry round trip as read-only memmaps, atomic layout, memoised file hashes."""
import os

import numpy as np
import pytest

import resforge.data.cache as cache


def test_entry_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    meta = {"name": "x", "splits": {"train": {"ids": ["a", "b"]}, "val": {"ids": []}}}
    arrays = {"train": (images, np.array([1, 0])), "val": (images[:0], np.array([], np.int64))}
    cache.write_entry(tmp_path, "f" * 64, meta, arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f" * 64]          # no temp folder left
    hit = cache.read_entry(tmp_path, "f" * 64)
    imgs, labels = hit["arrays"]["train"]
    assert isinstance(imgs, np.memmap) and imgs.mode == "r" and np.array_equal(imgs, images)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0]
    assert hit["arrays"]["val"][0].shape == (0, 3, 4, 5)
    assert hit["meta"]["splits"]["train"] == {"ids": ["a", "b"], "shape": [2, 3, 4, 5]}
    assert cache.read_entry(tmp_path, "0" * 64) is None
    cache.write_entry(tmp_path, "f" * 64, meta, arrays)                      # racing writer: fine


def test_corrupt_entry_is_a_clear_error(tmp_path):
    meta = {"splits": {"train": {}}}
    entry = cache.write_entry(tmp_path, "e" * 64, meta, {"train": (np.zeros((4, 1, 2, 2), np.uint8), [0] * 4)})
    (entry / "train.u8").write_bytes(b"short")
    with pytest.raises(ValueError, match="corrupt data cache entry .*delete that folder"):
        cache.read_entry(tmp_path, "e" * 64)


def test_file_hash_memoised_by_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(b"abc" * 1000)
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: calls.append(p) or real(p))
    h1 = cache.file_sha256(f, tmp_path / "c")
    assert cache.file_sha256(f, tmp_path / "c") == h1 and len(calls) == 1
    f.write_bytes(b"abd" * 1000)                                              # same size ...
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))      # ... new mtime
    assert cache.file_sha256(f, tmp_path / "c") != h1 and len(calls) == 2


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path
    monkeypatch.delenv("RESFORGE_CACHE")
    assert cache.default_cache_dir().parts[-3:] == (".cache", "resforge", "cache")

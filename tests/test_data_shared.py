"""Real data from the shared folder: CIFAR-10 binary .tar.xz and MedMNIST BreastMNIST .npz."""
import time

import numpy as np
import pytest

import resforge.data.cifar as cifar_mod
from resforge.data import load_source


def need(folder, name):
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} not found: this test needs the real data file {name}")
    return path


def test_cifar10_binary_tar_xz_then_cached(shared_data, tmp_cache, monkeypatch):
    archive = need(shared_data, "cifar-10-binary.tar.xz")
    b = load_source(archive)                       # streams the 140 MB archive (a few seconds)
    tr, te = b.splits["train"], b.splits["test"]
    assert tr.images.shape == (50000, 3, 32, 32) and te.images.shape == (10000, 3, 32, 32)
    assert np.bincount(tr.labels).tolist() == [5000] * 10
    assert np.bincount(te.labels).tolist() == [1000] * 10
    assert b.class_names[:3] == ["airplane", "automobile", "bird"] and b.class_names[-1] == "truck"
    assert tr.ids[0] == "data_batch_1.bin:0" and te.ids[-1] == "test_batch.bin:9999"

    def no_reading(path):
        raise AssertionError("the archive was read again instead of the cache")
    monkeypatch.setattr(cifar_mod, "read_cifar", no_reading)
    start = time.perf_counter()
    again = load_source(archive)                   # memoised archive hash + memmap cache
    assert time.perf_counter() - start < 2.0
    assert isinstance(again.splits["train"].images, np.memmap)
    assert again.fingerprint == b.fingerprint
    assert np.array_equal(again.splits["test"].images[-5:], te.images[-5:])


def test_breastmnist_npz(shared_data, tmp_cache):
    b = load_source(need(shared_data, "breastmnist.npz"))
    assert b.name == "breastmnist" and b.class_names == ["0", "1"]
    assert {s: len(sp.labels) for s, sp in b.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert b.splits["train"].images.shape == (546, 1, 28, 28) and b.channels == 1
    assert set(np.unique(b.splits["test"].labels)) == {0, 1}

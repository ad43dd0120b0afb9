"""load_source for digits, .npz, synthetic CIFAR (binary/python, archive/folder) and errors."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from resforge.data import UnsafePickleError, load_source
from resforge.data.sources import DataBundle

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- digits

def test_digits_bundle(tmp_cache):
    b = load_source("digits")
    assert isinstance(b, DataBundle) and b.name == "digits"
    assert set(b.splits) == {"train", "test"}
    tr, te = b.splits["train"], b.splits["test"]
    assert tr.images.shape == (1437, 1, 8, 8) and te.images.shape == (360, 1, 8, 8)
    assert tr.images.dtype == np.uint8 and tr.images.max() == 255 and tr.labels.dtype == np.int64
    assert b.channels == 1 and b.image_size == (8, 8) and b.class_names == [str(i) for i in range(10)]
    assert np.bincount(te.labels).min() >= 35                      # stratified 20%
    assert not set(tr.ids) & set(te.ids)
    again = load_source("digits")
    assert again.splits["test"].ids == te.ids and again.fingerprint == b.fingerprint


def test_digits_conformed_to_requested_size_and_channels(tmp_cache):
    b = load_source("digits", image_size=16, channels=3)
    assert b.splits["train"].images.shape == (1437, 3, 16, 16) and b.image_size == (16, 16)
    assert b.fingerprint != load_source("digits").fingerprint


# ---------------------------------------------------------------- npz

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_gray_and_class_names(tmp_path, tmp_cache):
    path = write_npz(tmp_path / "tiny.npz",
                     train_images=RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8),
                     train_labels=np.array([[0], [1], [2], [0], [1], [2]]),
                     test_images=RNG.integers(0, 256, (3, 5, 4), dtype=np.uint8),
                     test_labels=np.array([2, 1, 0]), class_names=np.array(["a", "b", "c"]))
    b = load_source(path)
    assert b.name == "tiny" and b.class_names == ["a", "b", "c"] and set(b.splits) == {"train", "test"}
    assert b.splits["train"].images.shape == (6, 1, 5, 4) and b.image_size == (5, 4)
    assert b.splits["train"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert b.splits["test"].ids == ["test:0", "test:1", "test:2"]


def test_npz_rgb_and_default_names(tmp_path, tmp_cache):
    imgs = RNG.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    b = load_source(write_npz(tmp_path / "rgb.npz", train_images=imgs, train_labels=np.array([0, 3, 1, 0])))
    assert b.class_names == ["0", "1", "2", "3"] and b.channels == 3
    assert np.array_equal(b.splits["train"].images[1], imgs[1].transpose(2, 0, 1))


@pytest.mark.parametrize("labels,extra,needle", [
    (np.array([0, -1, 1]), {}, "out of range"),
    (np.array([0, 1, 5]), {"class_names": np.array(["a", "b"])}, "out of range 0..1"),
    (np.array([0.0, 0.5, 1.0]), {}, "integer class indices"),
    (np.array([[0, 1], [1, 0], [0, 0]]), {}, "multi-label"),
    (np.array([0, 1]), {}, "3 'train_images' but 2"),
])
def test_npz_bad_labels_clear_errors(tmp_path, tmp_cache, labels, extra, needle):
    path = write_npz(tmp_path / "bad.npz", train_images=np.zeros((3, 4, 4), np.uint8),
                     train_labels=labels, **extra)
    with pytest.raises(ValueError, match=needle) as err:
        load_source(path)
    assert "bad.npz" in str(err.value)


def test_npz_without_image_keys(tmp_path, tmp_cache):
    with pytest.raises(ValueError, match="train_images.*x/y, X/y, images/labels"):
        load_source(write_npz(tmp_path / "x.npz", images=np.zeros((2, 2, 2), np.uint8)))


@pytest.mark.parametrize("keys", [("x", "y"), ("X", "y"), ("images", "labels")])
def test_npz_one_pool_channels_first_is_split_like_a_folder(tmp_path, tmp_cache, keys):
    """x/y as most tutorials save them, channels first: one pool, val and test carved from it."""
    imgs = RNG.integers(0, 256, (60, 3, 6, 5), dtype=np.uint8)              # (N, C, H, W)
    labels = np.arange(60) % 3
    b = load_source(write_npz(tmp_path / "pool.npz", **{keys[0]: imgs, keys[1]: labels}))
    assert b.channels == 3 and b.image_size == (6, 5) and b.class_names == ["0", "1", "2"]
    assert np.array_equal(b.splits["train"].images[0], imgs[0])
    from resforge.data import make_splits
    split, _ = make_splits(b, 0.1, 0)
    assert {s: len(sp.labels) for s, sp in split.splits.items() if len(sp.labels)}.keys() == {"train", "val", "test"}


# ---------------------------------------------------------------- CIFAR (synthetic)

def cifar_batch(n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, k, n)


def tar_folder(archive, folder_name, files: dict, mode="w:gz"):
    with tarfile.open(archive, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder_name}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return archive


def cifar10_python_files(n=4):
    files, expected = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        data, labels = cifar_batch(n, 10, seed)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}
        files[name] = pickle.dumps(batch, protocol=2)             # py2-style bytes keys
        expected[name] = (data, labels)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    return files, expected


def test_cifar10_python_archive_by_name(tmp_path, tmp_cache):
    files, expected = cifar10_python_files()
    tar_folder(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    b = load_source("cifar10", data_root=tmp_path)
    assert b.name == "cifar10" and b.class_names[3] == "class3"
    tr, te = b.splits["train"], b.splits["test"]
    assert tr.images.shape == (20, 3, 32, 32) and te.images.shape == (4, 3, 32, 32)
    data, labels = expected["data_batch_2"]
    assert np.array_equal(tr.images[4:8].reshape(4, 3072), data)
    assert tr.labels[4:8].tolist() == labels.tolist() and tr.ids[4] == "data_batch_2:0"


def test_malicious_pickle_inside_cifar_archive(tmp_path, tmp_cache):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files, _ = cifar10_python_files()
    files["data_batch_3"] = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    archive = tar_folder(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    with pytest.raises(UnsafePickleError, match="data_batch_3"):
        load_source(archive)
    assert not marker.exists()


def cifar100_binary_files(n_train=7, n_test=3):
    def records(n, seed):
        rng = np.random.default_rng(seed)
        coarse, fine = rng.integers(0, 20, n), rng.integers(0, 100, n)
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return np.column_stack([coarse, fine, pixels]).astype(np.uint8).tobytes(), fine, pixels
    train, fine, pixels = records(n_train, 1)
    test, _, _ = records(n_test, 2)
    names = "\n".join(f"fine{i}" for i in range(100)).encode()
    return {"train.bin": train, "test.bin": test, "fine_label_names.txt": names}, fine, pixels


def test_cifar100_binary_extracted_folder_uses_fine_labels(tmp_path, tmp_cache):
    files, fine, pixels = cifar100_binary_files()
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    b = load_source(folder)
    assert b.name == "cifar100" and len(b.class_names) == 100 and b.class_names[7] == "fine7"
    assert b.splits["train"].labels.tolist() == fine.tolist()
    assert np.array_equal(b.splits["train"].images.reshape(7, 3072), pixels)
    assert len(b.splits["test"].labels) == 3


def test_cifar100_python_folder_by_name_and_by_path(tmp_path, tmp_cache):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = {}
    for seed, name in enumerate(["train", "test"]):
        data, labels = cifar_batch(5, 100, seed)
        fine[name] = labels
        batch = {"data": data, "fine_labels": labels.tolist(), "coarse_labels": [0] * 5}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    b = load_source("cifar100", data_root=tmp_path)
    assert b.splits["test"].labels.tolist() == fine["test"].tolist() and b.class_names[99] == "f99"
    assert load_source(folder).fingerprint == b.fingerprint


def test_cifar10_binary_tar_xz_and_truncated_batch(tmp_path, tmp_cache):
    files = {}
    for i, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
        data, labels = cifar_batch(2, 10, i)
        files[name] = np.column_stack([labels, data]).astype(np.uint8).tobytes()
    files["batches.meta.txt"] = b"\n".join(f"c{i}".encode() for i in range(10)) + b"\n\n"
    b = load_source(tar_folder(tmp_path / "cifar-10-binary.tar.xz", "cifar-10-batches-bin", files, "w:xz"))
    assert b.splits["train"].images.shape == (10, 3, 32, 32) and b.class_names[-1] == "c9"
    files["test_batch.bin"] = files["test_batch.bin"][:-5]
    (tmp_path / "bad").mkdir()
    bad = tar_folder(tmp_path / "bad" / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    with pytest.raises(ValueError, match="test_batch.bin.*truncated"):
        load_source(bad)


def test_cifar_not_found_says_where_and_how(tmp_path, tmp_cache):
    with pytest.raises(FileNotFoundError) as err:
        load_source("cifar100", data_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python.tar.gz") in msg and "--download" in msg



def test_cifar_not_found_under_a_relative_root_names_the_folder_it_means(tmp_path, tmp_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_source("cifar10", data_root="../no-such-folder")
    assert f"(= {tmp_path.parent / 'no-such-folder'}, relative to {tmp_path})" in str(err.value)
    assert "does not exist" in str(err.value)


def test_unknown_spec(tmp_cache):
    with pytest.raises(FileNotFoundError, match="'nope'.*digits"):
        load_source("nope")

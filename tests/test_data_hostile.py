"""A hostile corpus, generated here: every file is handled or rejected with a sentence naming it.

Images (truncated, empty, HTML named .jpg, decompression bomb, 16-bit, CMYK, palette, EXIF),
special files (FIFO, dangling symlink, symlink loop, /dev/null, symlinked folder, non-UTF-8
names), .npz files (damaged, huge declared shapes, bad dtypes, NaN, sparse/huge labels, one
class) and truncated CIFAR archives. Anything that could hang (a FIFO) runs under a deadline.
"""
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format
from PIL import Image

from resforge.data import load_source, scan
from resforge.data.images import decode_image, probe_image
from resforge.data.limits import DataLimits

SRC = str(Path(__file__).resolve().parents[1] / "src")
BAD_NAME = os.fsdecode(b"caf\xe9-\xff.jpg")            # not UTF-8: surrogate-escaped by Python


def noise(path, seed=0, size=(8, 8), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def two_classes(root):
    for c in ("a", "b"):
        for i in range(2):
            noise(root / c / f"{i}.png", seed=10 * ord(c) + i)
    return root


def with_deadline(fn, seconds=60):
    """Run fn in a daemon thread; a hang (e.g. a FIFO opened for reading) fails the test."""
    box = {}
    t = threading.Thread(target=lambda: box.update(out=_call(fn)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (hung on a special file?)"
    if isinstance(box["out"], BaseException):
        raise box["out"]
    return box["out"]


def _call(fn):
    try:
        return fn()
    except BaseException as e:  # re-raised in the test's thread
        return e


def cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "resforge.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- image files

def hostile_images(folder):
    """-> {file name: None if it must load, else a word its reject reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg = noise(folder / "tmp.jpg", 1, size=(64, 64)).read_bytes()
    (folder / "tmp.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")          # 10^8 px, ~12 kB file
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(folder / "sixteen.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(folder / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # rotate 90 degrees
    Image.new("RGB", (16, 8), (0, 0, 255)).save(folder / "rotated.jpg", exif=exif)
    return {"truncated.jpg": "truncated", "zero.png": "empty", "page.jpg": "not an image",
            "bomb.png": "decompression-bomb", "sixteen.png": None, "cmyk.jpg": None,
            "palette.gif": None, "rotated.jpg": None}


@pytest.mark.parametrize("stream", [False, True], ids=["decoded", "streamed"])
def test_hostile_images_are_rejected_or_read(tmp_path, tmp_cache, stream):
    root = two_classes(tmp_path / "ds")
    expect = hostile_images(root / "a")
    b = load_source(root, image_size=8, channels=3, stream=stream)
    reasons = {r["id"]: r["reason"] for r in b.rejected}
    assert set(reasons) == {f"a/{n}" for n, word in expect.items() if word}
    for name, word in expect.items():
        if word:
            assert word in reasons[f"a/{name}"], (name, reasons[f"a/{name}"])
        else:
            assert f"a/{name}" in b.splits["train"].ids
    if not stream:                                   # decoded values of the odd modes
        img = dict(zip(b.splits["train"].ids, b.splits["train"].images))
        assert img["a/sixteen.png"].min() == 255                        # 65535 -> 255, not clipped
        assert img["a/palette.gif"][:, 4, 4].tolist() == [255, 0, 0]
        assert img["a/cmyk.jpg"][0].mean() > 200 and img["a/cmyk.jpg"][1:].mean() < 60   # red
    report = scan(b) if not stream else None
    if report:
        assert len(report["rejected"]) == 4


def test_exif_rotation_is_applied(tmp_path):
    hostile_images(tmp_path)
    assert probe_image(tmp_path / "rotated.jpg")[0] == (16, 8)
    assert decode_image(tmp_path / "rotated.jpg").shape == (16, 8, 3)


def test_streamed_truncated_jpeg_never_reaches_a_worker(tmp_path, tmp_cache):
    """Before: the header probe passed it and a DataLoader worker died on it mid-training."""
    from torch.utils.data import DataLoader
    from resforge.data import FileImageDataset
    root = two_classes(tmp_path / "ds")
    jpg = noise(tmp_path / "x.jpg", 3, size=(64, 64)).read_bytes()
    (root / "b" / "cut.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    b = load_source(root, image_size=8, channels=3, stream=True)
    assert [r["id"] for r in b.rejected] == ["b/cut.jpg"]
    x = [xb for xb, _ in DataLoader(FileImageDataset.from_split(b, "train"), batch_size=2,
                                    num_workers=1)]
    assert sum(len(xb) for xb in x) == 4


# ---------------------------------------------------------------- special files

def special_tree(root):
    """Two good classes plus entries that must be skipped unopened or reported safely."""
    two_classes(root)
    a = root / "a"
    os.mkfifo(a / "pipe.jpg")
    os.symlink(a / "gone.png", a / "dangling.png")
    os.symlink(a / "loop.png", a / "loop.png")
    os.symlink("/dev/null", a / "null.png")
    os.symlink(root / "b", a / "linked")                               # folder symlink: not walked
    noise(Path(os.fsdecode(os.path.join(os.fsencode(a), os.fsencode(BAD_NAME)))), 7)  # readable
    bad = os.path.join(os.fsencode(root / "b"), b"broken-\xff\n.png")  # unreadable, odd name
    with open(bad, "wb") as f:
        f.write(b"garbage")
    sock = None
    if len(str(a / "sock.png")) < 100:                                 # AF_UNIX path limit
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(a / "sock.png"))
    return sock


SPECIAL = {"a/pipe.jpg": "FIFO", "a/dangling.png": "dangling symlink", "a/loop.png": "symlink loop",
           "a/null.png": "character device", "a/linked": "symlink to a folder",
           "b/broken-\\xff\\n.png": "not an image"}


@pytest.mark.parametrize("stream", [False, True], ids=["decoded", "streamed"])
def test_special_files_are_skipped_unopened(tmp_path, tmp_cache, stream):
    root = tmp_path / "ds"
    sock = special_tree(root)
    try:
        b = with_deadline(lambda: load_source(root, stream=stream))
    finally:
        if sock:
            sock.close()
    reasons = {r["id"]: r["reason"] for r in b.rejected}
    expect = {**SPECIAL, **({"a/sock.png": "socket"} if sock else {})}
    assert set(reasons) == set(expect)
    for rid, word in expect.items():
        assert word in reasons[rid], (rid, reasons[rid])
    for r in b.rejected:                                 # printable, UTF-8-encodable names
        assert r["id"].isprintable() and r["path"].isprintable()
        r["path"].encode("utf-8")
    assert os.path.join("a", BAD_NAME) in b.splits["train"].ids      # an odd name that decodes is kept
    assert len(b.splits["train"].ids) == 5


def test_report_writes_odd_names(tmp_path, tmp_cache):
    """Before: a non-UTF-8 rejected name crashed report.md after training."""
    from resforge.report import write_report
    root = tmp_path / "ds"
    sock = special_tree(root)
    b = with_deadline(lambda: load_source(root))
    if sock:
        sock.close()
    _, md = write_report(tmp_path / "run", {}, meta={"model": "resnet20", "class_names": b.class_names},
                         extra={"rejected": b.rejected})
    text = md.read_text(encoding="utf-8")
    assert "broken-\\xff\\n.png" in text and "FIFO" in text


def test_cli_scan_of_a_hostile_tree_finishes_and_lists_everything(tmp_path):
    root = tmp_path / "ds"
    sock = special_tree(root)
    out = tmp_path / "scan.json"
    r = cli("data", "scan", root, "--json", out, timeout=120)          # a FIFO read would hang here
    if sock:
        sock.close()
    assert r.returncode == 0, r.stderr
    rejected = {x["id"] for x in json.loads(out.read_text())["rejected"]}
    assert rejected >= set(SPECIAL) and f"rejected files: {len(rejected)}" in r.stdout


# ---------------------------------------------------------------- .npz files

def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_arrays(n=8, h=8, w=8):
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 256, (n, h, w), dtype=np.uint8),
            "train_labels": np.arange(n) % 2}


def declared_only(path, shapes: dict):
    """An .npz whose members are .npy headers declaring shapes, with no data behind them."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, (shape, dtype) in shapes.items():
            buf = io.BytesIO()
            npy_format.write_array_header_2_0(buf, {"descr": npy_format.dtype_to_descr(np.dtype(dtype)),
                                                    "fortran_order": False, "shape": shape})
            zf.writestr(f"{key}.npy", buf.getvalue())
    return path


def _with(**changes):
    return {**good_arrays(), **changes}


NPZ_CASES = {
    "mixed-size": (_with(test_images=np.zeros((2, 10, 10), np.uint8), test_labels=[0, 1]),
                   "different image shapes"),
    "negative-label": (_with(train_labels=np.array([0, 1, -1, 1, 0, 1, 0, 1])), "out of range"),
    "float-0-1": (_with(train_images=np.full((8, 8, 8), 0.5)), r"float64 \(values 0.5..0.5\)"),
    "float-outside": (_with(train_images=np.full((8, 8, 8), 300.0)), "outside 0..255"),
    "nan": (_with(train_images=np.where(np.eye(8)[None] > 0, np.nan, 0.5).repeat(8, 0)), "NaN"),
    "int-outside": (_with(train_images=np.full((8, 8, 8), -3, np.int16)), "outside 0..255"),
    "zero-size": (_with(train_images=np.zeros((8, 0, 0), np.uint8)), "zero size 0x0"),
    "label-2^62": (_with(train_labels=np.array([0, 1, 0, 1, 0, 1, 0, 2**62])), f"label {2**62}"),
    "label-1e6": (_with(train_labels=np.array([0, 1, 2, 3, 4, 5, 6, 10**6])), "label 1000000"),
    "one-class": (_with(train_labels=np.zeros(8, np.int64)), "only one class"),
    "names-one-used": (_with(train_labels=np.zeros(8, np.int64), class_names=np.array(["cat", "dog"])),
                       "only one class \\('cat'\\)"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_npz_contents_are_one_sentence(tmp_path, tmp_cache, case):
    arrays, message = NPZ_CASES[case]
    path = npz(tmp_path / f"{case}.npz", **arrays)
    with pytest.raises(ValueError, match=message) as e:
        with_deadline(lambda: load_source(path), seconds=30)            # 2**62 used to hang
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_integer_images_within_0_255_are_accepted(tmp_path, tmp_cache):
    path = npz(tmp_path / "i64.npz", **_with(train_images=np.full((8, 8, 8), 200, np.int64)))
    assert int(load_source(path).splits["train"].images.max()) == 200


def test_small_label_gap_warns_and_keeps_classes(tmp_path, tmp_cache):
    path = npz(tmp_path / "gap.npz", **_with(train_labels=np.array([0, 2, 0, 2, 0, 2, 0, 2])))
    with pytest.warns(UserWarning, match=r"classes \[1\] have no items"):
        assert load_source(path).class_names == ["0", "1", "2"]


@pytest.mark.parametrize("shapes, message", [
    ({"train_images": ((2**40, 32, 32), "u1"), "train_labels": ((2**40,), "i8")}, "max_bytes"),
    ({"train_images": ((4, 2**20, 2**20), "u1"), "train_labels": ((4,), "i8")}, "max_image_side"),
    ({"train_images": ((4, 8, 8), "u1"), "train_labels": ((4,), "i8"),
      "class_names": ((10**9,), "U8")}, "max_classes"),
], ids=["888PiB", "huge-side", "huge-names"])
def test_absurd_declared_shapes_refused_before_allocating(tmp_path, tmp_cache, shapes, message):
    path = declared_only(tmp_path / "huge.npz", shapes)
    with pytest.raises(ValueError, match=message):
        load_source(path)


def test_damaged_npz_files_are_one_sentence(tmp_path, tmp_cache):
    data = npz(tmp_path / "ok.npz", **good_arrays()).read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    flipped = bytearray(data)
    at = data.index(b"\x93NUMPY", data.index(b"train_images.npy")) + 200   # inside the pixel data
    flipped[at] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    np.savez_compressed(tmp_path / "z.npz", **good_arrays(n=64, h=32, w=32))
    z = (tmp_path / "z.npz").read_bytes()
    (tmp_path / "zcut.npz").write_bytes(z[: len(z) - 300])              # deflate stream cut
    for name in ("cut", "empty", "crc", "zcut"):
        with pytest.raises(ValueError, match=f"{name}.npz: damaged or not an .npz file"):
            load_source(tmp_path / f"{name}.npz")


def test_cli_scan_of_a_damaged_npz_exits_2_with_one_line(tmp_path):
    data = npz(tmp_path / "ok.npz", **good_arrays()).read_bytes()
    flipped = bytearray(data)
    flipped[data.index(b"\x93NUMPY", data.index(b"train_images.npy")) + 200] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    r = cli("data", "scan", tmp_path / "crc.npz", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "crc.npz: damaged or not an .npz file" in r.stderr


# ---------------------------------------------------------------- limits

def test_limits_are_named_and_settable(tmp_path, tmp_cache, monkeypatch):
    with pytest.raises(ValueError, match="max_image_side=4096"):
        load_source("digits", image_size=100_000)                      # refused before allocating
    monkeypatch.setenv("RESFORGE_MAX_DATA_BYTES", "100000")
    with pytest.raises(ValueError, match="max_bytes.*RESFORGE_MAX_DATA_BYTES"):
        load_source("digits", image_size=16)
    monkeypatch.setenv("RESFORGE_MAX_CLASSES", "5")
    with pytest.raises(ValueError, match="more than the limit max_classes=5"):
        load_source(npz(tmp_path / "ten.npz", **_with(train_labels=np.arange(8) % 8)))
    monkeypatch.setenv("RESFORGE_MAX_CLASSES", "lots")
    with pytest.raises(ValueError, match="RESFORGE_MAX_CLASSES='lots' is not a number"):
        DataLimits.from_env()


def test_folder_bytes_checked_before_decoding(tmp_path, tmp_cache):
    root = two_classes(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"4 images at 3x64x64 needs .* max_bytes"):
        load_source(root, image_size=64, limits=DataLimits(max_bytes=10_000))


def test_one_class_folder_is_refused(tmp_path, tmp_cache):
    for i in range(3):
        noise(tmp_path / "ds" / "cats" / f"{i}.png", i)
    with pytest.raises(ValueError, match="only one class \\('cats'\\); a classifier needs at least 2"):
        load_source(tmp_path / "ds")


# ---------------------------------------------------------------- CIFAR archives

def cifar_tar(path, mode):
    recs = np.zeros((50, 3073), np.uint8)
    recs[:, 0] = np.arange(50) % 10
    recs[:, 1:] = np.random.default_rng(0).integers(0, 256, (50, 3072))
    with tarfile.open(path, mode) as tf:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = recs.nbytes
            tf.addfile(info, io.BytesIO(recs.tobytes()))
    return path


@pytest.mark.parametrize("suffix, mode", [(".tar.gz", "w:gz"), (".tar.xz", "w:xz"), (".tar", "w")])
def test_truncated_cifar_archive_is_one_sentence(tmp_path, tmp_cache, suffix, mode):
    good = cifar_tar(tmp_path / f"cifar-10-binary{suffix}", mode)
    assert len(load_source(good).splits["train"].labels) == 250
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.tar") as e:
        load_source(cut)
    assert "re-download" in str(e.value) or "download again" in str(e.value)


def test_truncated_cifar_python_batch_is_one_sentence(tmp_path, tmp_cache):
    """Before: pickle's UnpicklingError escaped as a traceback."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}, protocol=2))
    assert load_source(folder).class_names[0] == "a"
    (folder / "data_batch_3").write_bytes(batch[: len(batch) // 2])
    with pytest.raises(ValueError, match="data_batch_3: not a readable pickle.*re-download"):
        load_source(folder)


def test_too_many_class_folders_refused_before_reading(tmp_path, tmp_cache, monkeypatch):
    import resforge.data.folder as folder_mod
    root = two_classes(tmp_path / "ds")
    noise(root / "c" / "0.png", 5)
    for reader in ("probe_image", "verify_image"):
        monkeypatch.setattr(folder_mod, reader, lambda *a: pytest.fail("a file was read"))
    for stream in (False, True):
        with pytest.raises(ValueError, match=r"\(one class per folder\) defines 3 classes.*max_classes=2"):
            load_source(root, stream=stream, limits=DataLimits(max_classes=2))


def test_a_fifo_or_device_as_the_source_is_refused_unopened(tmp_path, tmp_cache):
    os.mkfifo(tmp_path / "cifar-10-binary.tar.gz")                     # would block tarfile
    os.symlink("/dev/zero", tmp_path / "zero.npz")                     # would never end
    for name, word in (("cifar-10-binary.tar.gz", "FIFO"), ("zero.npz", "character device")):
        with pytest.raises(ValueError, match=f"{name}: a {word}.*not a regular file"):
            with_deadline(lambda: load_source(tmp_path / name), seconds=30)

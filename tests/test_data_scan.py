"""scan / format_scan: counts, rejects, ignored files, duplicates within and across splits."""
import shutil

import numpy as np
from PIL import Image

from resforge.data import format_scan, load_source, scan


def noise_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_scan_finds_planted_duplicates_and_leaks(tmp_path, tmp_cache):
    root = tmp_path / "ds"
    seed = 0
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                noise_png(root / split / c / f"{i}.png", seed := seed + 1)
    shutil.copy(root / "train/a/0.png", root / "train/a/copy.png")       # within train
    shutil.copy(root / "train/b/1.png", root / "test/b/leak.png")        # train -> test leak
    arr = np.asarray(Image.open(root / "val/a/0.png"))
    Image.fromarray(arr).save(root / "train/b/same_pixels.bmp")          # same pixels, other bytes
    (root / "train/b/broken.png").write_bytes(b"")
    (root / "train/b/.DS_Store").write_bytes(b"x")

    report = scan(root)
    assert report["counts"]["train"] == {"a": 5, "b": 5} and report["counts"]["test"]["b"] == 3
    assert [r["id"] for r in report["rejected"]] == ["train/b/broken.png"] and report["ignored"] == 1
    assert report["duplicates"]["pixels"]["train"] == [["train/a/0.png", "train/a/copy.png"]]
    assert report["duplicates"]["files"]["train"] == [["train/a/0.png", "train/a/copy.png"]]
    pixel_leaks = sorted(sorted(g.items()) for g in report["leaks"]["pixels"])
    assert pixel_leaks == [[("test", ["test/b/leak.png"]), ("train", ["train/b/1.png"])],
                           [("train", ["train/b/same_pixels.bmp"]), ("val", ["val/a/0.png"])]]
    assert report["leaks"]["files"] == [{"train": ["train/b/1.png"], "test": ["test/b/leak.png"]}]

    text = format_scan(report)
    assert "LEAKAGE (pixels identical across splits): 2 groups" in text
    assert "train/b/broken.png: empty file" in text and "ignored (hidden / not images): 1" in text
    assert text.splitlines()[2].split() == ["class", "train", "val", "test", "all"]


def test_scan_of_a_loaded_bundle(tmp_cache):
    report = scan(load_source("digits"))
    assert sum(report["counts"]["train"].values()) == 1437 and report["leaks"]["pixels"] == []
    assert "files" not in report["duplicates"]                           # no files for arrays
    assert "total" in format_scan(report)


def test_scan_of_a_folder_builds_no_tensor(tmp_path, tmp_cache, monkeypatch):
    """Issue 19.4: scan needs counts and hashes only, so a folder is hashed file by file."""
    import resforge.data.folder as folder_mod

    def no_tensor(*a, **k):
        raise AssertionError("scan decoded the whole folder into one array")
    monkeypatch.setattr(folder_mod, "decode_tree", no_tensor)
    for c in ("a", "b"):
        for i in range(3):
            noise_png(tmp_path / "ds" / c / f"{i}.png", 100 + 10 * ord(c) + i)
    shutil.copy(tmp_path / "ds/a/0.png", tmp_path / "ds/b/dup.png")
    report = scan(tmp_path / "ds", stream=False)                         # what the CLI passes
    assert report["duplicates"]["pixels"]["train"] == [["a/0.png", "b/dup.png"]]
    assert report["counts"]["train"] == {"a": 3, "b": 4}
    assert not list(tmp_cache.rglob("*.u8"))                             # no tensor cached either

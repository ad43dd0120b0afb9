"""`resforge cache list|clear` on a temporary RESFORGE_CACHE, and data.class_names / --class-names."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resforge import cli
from resforge.config import load_config
from resforge.data import load_source

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(args, cache, cwd):
    env = {**os.environ, "PYTHONPATH": SRC, "RESFORGE_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "resforge.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def _tiny_npz(path, names=None, k=3, n=12):
    rng = np.random.default_rng(0)
    extra = {"class_names": np.array(names)} if names is not None else {}
    np.savez(path, train_images=rng.integers(0, 255, (n, 8, 8), dtype=np.uint8),
             train_labels=np.arange(n) % k, test_images=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8),
             test_labels=np.arange(6) % k, **extra)
    return path


def test_cache_list_and_clear_touch_only_entries(tmp_path, tmp_cache, capsys):
    npz = _tiny_npz(tmp_path / "tiny.npz")
    load_source(npz)                      # entry 1: tiny at 8x8
    load_source(npz, image_size=4)        # entry 2: tiny at 4x4
    entries = [p for p in tmp_cache.iterdir() if p.name != "memo"]
    assert len(entries) == 2 and all((p / "last_use.json").is_file() for p in entries)
    old = entries[0]                      # make one entry look unused for 10 days
    (old / "last_use.json").write_text(json.dumps({"last_use": time.time() - 10 * 86400}))
    (tmp_cache / "notes.txt").write_text("mine")                   # not an entry: never deleted
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "meta.json").write_text("{}")
    (tmp_cache / ("f" * 64)).symlink_to(outside, target_is_directory=True)  # entry-named link
    crashed = tmp_cache / ".tmp-0123456789abcdef-x1y2"                  # a dead writer's leftovers
    crashed.mkdir()
    (crashed / "train.u8").write_bytes(b"0" * 100)
    for p in (crashed / "train.u8", crashed):
        os.utime(p, (time.time() - 2 * 86400,) * 2)
    live = tmp_cache / ".tmp-fedcba9876543210-abcd"                     # a writer at work: kept
    live.mkdir()

    rc, out, err = _cli(["cache", "list"], tmp_cache, tmp_path)
    assert rc == 0, err
    assert str(npz) in out and "8x8" in out and "4x4" in out and "10.0 days ago" in out
    assert "2 entries" in out and "notes.txt" in out and "1 unfinished writes older than a day" in out

    rc, out, _ = _cli(["cache", "clear", "--older-than", "5", "--dry-run"], tmp_cache, tmp_path)
    assert rc == 0 and out.startswith("would free") and "1 entries" in out and old.exists()
    rc, out, _ = _cli(["cache", "clear", "--older-than", "5"], tmp_cache, tmp_path)
    assert rc == 0 and out.startswith("freed") and not old.exists()
    # the other forms in-process (a subprocess costs ~3 s each on a loaded 2-core machine)
    assert cli.main(["cache", "clear"]) == 2 and "--all" in capsys.readouterr().err
    assert cli.main(["cache", "clear", "--source", "tiny"]) == 0 and "1 entries" in capsys.readouterr().out
    assert cli.main(["cache", "clear", "--all"]) == 0 and "0 entries" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_cache.iterdir()) == sorted(["f" * 64, "memo", "notes.txt", live.name])
    assert (outside / "meta.json").is_file() and (tmp_cache / "notes.txt").read_text() == "mine"


def _bundle_names(tmp_path, npz, names_file=None):
    overrides = {"data.source": str(npz), "data.val_fraction": 0.5}
    if names_file is not None:
        overrides["data.class_names"] = str(names_file)
    from resforge.pipeline import prepare_data
    return prepare_data(load_config("default", overrides))[0].class_names


def test_class_names_from_npz_array_and_from_a_file(tmp_path, tmp_cache):
    assert _bundle_names(tmp_path, _tiny_npz(tmp_path / "a.npz", ["x", "y", "z"])) == ["x", "y", "z"]
    plain = _tiny_npz(tmp_path / "b.npz")
    assert _bundle_names(tmp_path, plain) == ["0", "1", "2"]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n\n")
    assert _bundle_names(tmp_path, plain, names) == ["cat", "dog", "bird"]
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="has 2 names but b has 3 classes"):
        _bundle_names(tmp_path, plain, names)
    names.write_text("cat\ncat\nbird\n")
    with pytest.raises(ValueError, match="'cat' appears twice"):
        _bundle_names(tmp_path, plain, names)


def test_train_class_names_option(tmp_path, tmp_cache, capsys, monkeypatch):
    npz = _tiny_npz(tmp_path / "c.npz", k=2)
    (tmp_path / "names.txt").write_text("benign\nmalignant\n")
    rc, _, err = _cli(["train", "--data", str(npz), "--class-names", "names.txt", "--epochs", "1",
                       "--project", "runs", "--name", "r", "model.name=resnet20", "train.progress=false",
                       "train.batch_size=4", "data.val_fraction=0.25"], tmp_cache, tmp_path)
    assert rc == 0, err
    report = json.loads((tmp_path / "runs" / "r" / "report.json").read_text())
    assert report["class_names"] == ["benign", "malignant"]
    assert "top-5" not in (tmp_path / "runs" / "r" / "report.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--data", str(npz), "--class-names", "missing.txt"]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "one class name per line" in err


def _folder(root, sizes):
    from PIL import Image
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_smaller_size_is_resized_from_the_native_entry(tmp_path, monkeypatch):
    """Same pixels and fingerprint as decoding every file again; mixed-size folders still decode."""
    from resforge.data import folder
    root = _folder(tmp_path / "imgs", [(12, 12)] * 6)
    fresh = load_source(root, image_size=8, cache_dir=tmp_path / "c1")
    load_source(root, cache_dir=tmp_path / "c2")                   # native 12x12 entry
    real = folder.decode_tree
    monkeypatch.setattr(folder, "decode_tree", lambda *a, **k: pytest.fail("decoded again"))
    derived = load_source(root, image_size=8, cache_dir=tmp_path / "c2")
    assert derived.fingerprint == fresh.fingerprint and derived.image_size == (8, 8)
    for s in fresh.splits:
        assert np.array_equal(derived.splits[s].images, fresh.splits[s].images)
        assert derived.splits[s].ids == fresh.splits[s].ids
    monkeypatch.setattr(folder, "decode_tree", real)
    mixed = _folder(tmp_path / "mixed", [(12, 12)] * 5 + [(20, 16)])
    load_source(mixed, cache_dir=tmp_path / "c3")                  # one image was resized: no reuse
    calls = []
    monkeypatch.setattr(folder, "decode_tree", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_source(mixed, image_size=8, cache_dir=tmp_path / "c3")
    assert calls == [1]

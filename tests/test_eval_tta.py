"""`resforge eval`: TTA views follow the run's augmentation, evaluations get a report folder of
their own (the run's training report is a record), and a weights file's sidecar never names data,
paths, downloads or caches (trust boundary)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resforge
from resforge.config import AugConfig
from resforge.data.augment import Augmenter, tta_view_names

SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run trained without flips (the recipe's aug.flip=none, aug.translate=1)."""
    root = tmp_path_factory.mktemp("evalrun")
    torch.set_num_threads(1)
    try:
        r = resforge.train("digits", ["data.image_size=8", "train.epochs=3", "train.batch_size=32", "optim.lr=0.1",
                                      "train.progress=false", f"train.project={root}", "train.name=r",
                                      f"data.cache_dir={root / 'cache'}"])
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return r


def test_tta_views_follow_the_augmentation_the_network_was_trained_with():
    def names(**aug):
        return Augmenter(AugConfig(**aug), [0.5], [0.25], 10, (16, 16)).tta_view_names()
    assert names(flip="none", translate=0) == ["identity"]
    assert names(flip="none", translate=2) == ["identity", "shift(+1,+1)", "shift(-1,-1)"]
    assert names(flip="random", translate=0) == ["identity", "mirror"]
    assert len(names(flip="alternate", translate=1)) == 6
    assert tta_view_names((96, 96)) == ["identity", "mirror"]           # no 1-px shifts of large images
    aug = Augmenter(AugConfig(flip="none", translate=1), [0.5], [0.25], 10, (8, 8))
    x = torch.rand(4, 1, 8, 8)
    views = aug.tta_views(x)
    assert len(views) == 3 and all(v.shape == x.shape for v in views)
    assert not any(torch.equal(v, x.flip(3)) for v in views)


def test_eval_tta_of_a_run_trained_without_flips_uses_no_mirror(run, monkeypatch, tmp_path):
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path / "cache"))
    plain = resforge.evaluate(run.dir, out_dir=tmp_path / "plain")["test"]
    tta = resforge.evaluate(run.dir, tta=True, out_dir=tmp_path / "tta")["test"]
    assert tta["tta_views"] == ["identity", "shift(+1,+1)", "shift(-1,-1)"]
    assert tta["top1"] >= plain["top1"] - 0.02          # a mirror view cost digits ~10 points
    report = json.loads((tmp_path / "tta" / "report.json").read_text())
    assert report["tta"]["views"] == tta["tta_views"] and "run's aug config" in report["tta"]["from"]
    md = (tmp_path / "tta" / "report.md").read_text()
    assert "## Test-time augmentation" in md and "`shift(+1,+1)`" in md and "mirror" not in md.split("chosen")[0]


def test_eval_writes_its_own_report_folder_and_never_replaces_one(run, tmp_path, monkeypatch):
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path / "cache"))
    record = (run.dir / "report.json").read_bytes(), (run.dir / "report.md").read_bytes()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "RESFORGE_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "resforge.cli", "eval", str(run.dir), *args], env=env,
                              capture_output=True, text=True, timeout=300)
    first = cli("--tta")
    assert first.returncode == 0, first.stderr
    out = run.dir / "eval" / "best-test-tta"
    assert f"report: {out / 'report.md'}" in first.stdout and "is unchanged" in first.stdout
    assert json.loads((out / "report.json").read_text())["test"]["tta"] is True
    resforge.evaluate(run.dir, tta=True)                    # again: a second folder, nothing replaced
    assert (run.dir / "eval" / "best-test-tta-2" / "report.json").is_file()
    assert ((run.dir / "report.json").read_bytes(), (run.dir / "report.md").read_bytes()) == record
    before = (out / "report.json").read_bytes()
    clash = cli("--out", str(out))                          # an existing report is never overwritten
    assert clash.returncode == 2 and "already holds a report" in clash.stderr and "Traceback" not in clash.stderr
    assert (out / "report.json").read_bytes() == before


def _hostile_copy(weights: Path, dest: Path, **data) -> Path:
    """Copy a checkpoint and rewrite its sidecar's config.data as an attacker would, with a matching sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    w = Path(shutil.copy(weights, dest / weights.name))
    side = json.loads(weights.with_suffix(".json").read_text())
    side["config"]["data"].update(data)
    side["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    w.with_suffix(".json").write_text(json.dumps(side))
    return w


def test_a_bare_weights_file_never_chooses_its_data_cache_or_download(run, tmp_path, monkeypatch):
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path / "local-cache"))
    evil = tmp_path / "evil"
    w = _hostile_copy(run.dir / "weights" / "best.safetensors", tmp_path / "deep" / "a" / "b",
                      cache_dir="../../..", source=str(evil / "planted.npz"), data_root=str(evil), download=True)
    monkeypatch.chdir(w.parent)                                    # "../../.." is tmp_path from here
    with pytest.raises(ValueError, match="pass --data"):           # the sidecar never names the data
        resforge.evaluate(w, out_dir=tmp_path / "r0")
    res = resforge.evaluate(w, data="digits", out_dir=tmp_path / "r1")
    assert res["test"]["n"] == 360
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "local-cache", "r1"]   # no cache up there
    assert sorted(p.name for p in w.parent.iterdir()) == ["best.json", "best.safetensors"]
    assert not evil.exists() and any((tmp_path / "local-cache").iterdir())


def test_a_run_folder_config_gives_the_data_source_but_never_the_cache_or_download(run, tmp_path, monkeypatch):
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path / "local-cache"))
    copy = tmp_path / "copied-run"
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("eval"))
    _hostile_copy(run.dir / "weights" / "best.safetensors", copy / "weights",          # sidecar: not read for data
                  source=str(tmp_path / "evil.npz"), cache_dir=str(tmp_path / "evil-side"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["data"].update(cache_dir=str(tmp_path / "evil-cache"), download=True)
    (copy / "config.json").write_text(json.dumps(cfg))
    res = resforge.evaluate(copy, out_dir=tmp_path / "r")
    assert res["test"]["n"] == 360                         # the run's own digits test split
    assert not (tmp_path / "evil-cache").exists() and not (tmp_path / "evil-side").exists()
    assert any((tmp_path / "local-cache").iterdir())

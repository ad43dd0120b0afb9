"""Every phase that can run for minutes says so (resforge.progress): a labelled bar on a terminal
(forced here with RESFORGE_PROGRESS=1, since pytest's stderr is no terminal), one start line off a
terminal once a phase runs long, and nothing at all for short phases off a terminal."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

import resforge
from resforge import progress
from resforge.pipeline import evaluate_bundle
from resforge.config import AugConfig
from resforge.data import load_source, scan
from resforge.data.augment import Augmenter
from resforge.data.loader import TensorBatches
from resforge.export import check_parity
from resforge.finetune.probe import extract_features
from resforge.training.device import make_runtime


@pytest.fixture
def bars(monkeypatch):
    monkeypatch.setenv("RESFORGE_PROGRESS", "1")


@pytest.fixture
def tree(tmp_path):
    """train/ and test/ folders of two classes, four 8x8 PNGs each."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / cls / f"{i}.png")
    return tmp_path / "img"


def _setup(k=2):
    rt = make_runtime("cpu", "fp32", False)
    aug = Augmenter(AugConfig(flip="none", translate=1), [0.5] * 3, [0.25] * 3, k, (8, 8))
    return resforge.create_model("resnet20", num_classes=k).eval(), aug, rt


def test_decoding_caching_and_scanning_show_labelled_bars(tree, tmp_path, bars, capsys):
    load_source(str(tree), cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "reading image headers" in err and "decoding images" in err and "writing the decoded-image cache" in err
    scan(str(tree))
    err = capsys.readouterr().err
    assert "checking images (full decode)" in err and "scanning: decoding and hashing images" in err
    assert "scanning: hashing files" in err


def test_evaluation_tta_features_and_parity_show_labelled_bars(tree, tmp_path, bars, capsys):
    model, aug, rt = _setup()
    bundle = load_source(str(tree), cache_dir=tmp_path / "cache")
    capsys.readouterr()
    evaluate_bundle(model, bundle, aug, rt, ["test"], True, batch_size=4, workers=0)
    assert "evaluating test (TTA x3)" in capsys.readouterr().err
    batches = TensorBatches(np.zeros((8, 3, 8, 8), np.uint8), np.arange(8) % 2, rt.device, 4)
    extract_features(model, batches, aug, rt, desc="extracting features (train)")
    assert "extracting features (train)" in capsys.readouterr().err
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    check_parity(model, lambda a: model(torch.from_numpy(a)).detach().numpy(), x)
    assert "checking export parity" in capsys.readouterr().err


def test_probe_fitting_and_bn_reestimation_show_labelled_bars(bars, capsys):
    from resforge.config import load_config
    from resforge.finetune.probe import linear_probe, reestimate_bn
    from resforge.training.loop import _batchnorms
    model, aug, rt = _setup()
    cfg = load_config("digits", ["finetune.probe_epochs=1"])
    feats = torch.randn(16, model.fc.in_features), torch.arange(16) % 2
    linear_probe(model.fc, feats, None, rt, cfg)
    assert "probe" in capsys.readouterr().err
    batches = TensorBatches(np.zeros((8, 3, 8, 8), np.uint8), np.arange(8) % 2, rt.device, 4)
    reestimate_bn(model, _batchnorms(model)[:2], batches, aug, rt)
    assert "re-estimating BN statistics" in capsys.readouterr().err


def test_off_a_terminal_short_phases_print_nothing_and_long_ones_one_line_each_end(monkeypatch, capsys):
    monkeypatch.delenv("RESFORGE_PROGRESS", raising=False)
    assert progress.mode() == "line"                       # pytest's captured stderr is no terminal
    assert list(progress.track(range(3), "evaluating val")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 0.05)
    for _ in progress.track(range(2), "evaluating val"):
        time.sleep(0.1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "evaluating val: 2 img..." and lines[1].startswith("evaluating val: done in ")
    monkeypatch.setenv("RESFORGE_PROGRESS", "0")            # off: not even the line
    for _ in progress.track(range(2), "evaluating val"):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_cli_scan_shows_its_phases_on_a_terminal_and_is_quiet_in_a_log(tree, tmp_path):
    """Through the real command line: forced bars name the phase; piped output (a log) stays clean."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "RESFORGE_CACHE": str(tmp_path / "c")}
    env.pop("RESFORGE_PROGRESS", None)

    def cli(**extra):
        return subprocess.run([sys.executable, "-m", "resforge.cli", "data", "scan", str(tree)],
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)
    shown, quiet = cli(RESFORGE_PROGRESS="1"), cli()
    assert shown.returncode == quiet.returncode == 0, shown.stderr + quiet.stderr
    assert "scanning: decoding and hashing images" in shown.stderr
    assert quiet.stderr == "" and shown.stdout == quiet.stdout

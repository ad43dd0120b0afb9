"""Few-shot classes (continual/fewshot.py): prototype rows, the merge into a new version, what
reads that version (load_for_inference, predict, ONNX export), and the CLI's refusals.

A ResNet-20 trained for 2 epochs on digits 0-6 (8x8) is the base model; digits 7, 8, 9 saved as
PNGs are the new classes it never saw."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resforge.continual import fewshot as F
from resforge.continual import versions as V
from resforge.models import create_model

NEW = {7: "seven", 8: "eight", 9: "nine"}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _digits():
    from resforge.data import arrays
    return arrays.digits_parts()["splits"]


def _write_pngs(folder: Path, images, rgb: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        a = img[0]
        Image.fromarray(np.stack([a] * 3, -1) if rgb else a).save(folder / f"{j}.png")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(run folder, support folder with 6 images of each new class, root)."""
    from resforge import api
    from resforge.config import load_config
    root = tmp_path_factory.mktemp("fewshot")
    s = _digits()
    arrays = {}
    for split, v in s.items():
        keep = v["labels"] < 7
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = v["images"][keep][:, 0], v["labels"][keep]
    arrays["class_names"] = np.array([str(i) for i in range(7)])
    np.savez(root / "base7.npz", **arrays)
    for c, name in NEW.items():
        _write_pngs(root / "support" / name, s["train"]["images"][s["train"]["labels"] == c][:6])
    cfg = load_config("digits", {"data.source": str(root / "base7.npz"), "data.image_size": 8, "train.epochs": 4,
                                 "train.project": str(root / "runs"), "train.name": "base", "train.progress": False,
                                 "data.cache_dir": str(root / "cache"), "train.threads": 1})
    run = api.train(config=cfg)
    return run.dir, root / "support", root


@pytest.fixture(scope="module")
def added(base_run):
    run, support, _ = base_run
    return F.fewshot(run, support, shots=5, device="cpu", say=lambda *_: None)


def test_prototype_rows_are_normalised_centred_means_and_old_rows_are_kept():
    torch.manual_seed(0)
    feats, labels = torch.randn(12, 64), torch.tensor([0, 1, 2] * 4)
    mu = torch.randn(64)
    p = F.prototypes(feats, labels, 3, mu)
    for c in range(3):
        m = (feats[labels == c].double() - mu.double()).mean(0)
        assert torch.allclose(p[c].double(), m / m.norm(), atol=1e-6)
    assert torch.allclose(p.norm(dim=1), torch.ones(3), atol=1e-6)
    net = create_model("resnet20", num_classes=5, in_chans=1).eval()
    merged = F.merge_rows(net, p, mu, scale=2.5).eval()
    assert torch.equal(merged.fc.weight[:5], net.fc.weight) and torch.equal(merged.fc.bias[:5], net.fc.bias)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before, after = net(x), merged(x)
        f = net.forward_head(net.forward_features(x), pre_logits=True)
    # old logits: the same rows; only the float rounding of a longer matmul may differ
    assert (after[:, :5] - before).abs().max() <= 1e-6 * max(1.0, before.abs().max().item())
    assert torch.allclose(after[:, 5:], 2.5 * (f - mu) @ p.T, atol=1e-4)
    assert merged.fc.out_features == 8 and merged.num_classes == 8


def test_calibrated_scale_lets_new_rows_win_on_their_class_only():
    # support images: old top logit 1.0, own score 0.5 (wins once s > 2); base images: old top
    # logit 3.0, best new score 0.5 (stolen once s > 6): every s in (2, 6] is perfect
    old_sup, z_sup = torch.ones(4, 3), torch.tensor([[0.5, 0.1]] * 2 + [[0.1, 0.5]] * 2)
    old_base, z_base = torch.full((5, 3), 3.0), torch.full((5, 2), 0.5)
    s, fit = F.calibrate_scale(old_sup, z_sup, [0, 0, 1, 1], old_base, z_base)
    assert 2 < s <= 6 and fit == {"support_ok": 1.0, "base_kept": 1.0}


def test_fewshot_writes_a_version_the_readers_understand(base_run, added):
    run, support, _ = base_run
    from resforge.checkpoint import load_for_inference
    from resforge.weightfile import resolve_weights
    v = added.version
    assert (v.number, v.parent) == (2, 1) and V.load_version(v.dir).number == 2
    assert v.class_names == [str(i) for i in range(7)] + ["eight", "nine", "seven"]
    assert v.record["method"]["name"] == "fewshot" and v.record["method"]["shots"] == 5
    assert v.record["method"]["centre"] == "base"
    new = v.data[-1]
    assert new["head_index"] == [7, 8, 9] and new["images"] == {"train": 15}
    assert json.loads((v.dir / new["manifest"]).read_text())["splits"]["train"][0].startswith("eight/")
    assert v.record["images_seen"] == V.load_version(run / "versions" / "v1").record["images_seen"] + 15
    m = v.record["metrics"]
    assert m["old_top1"] >= m["old_top1_before"] - 0.05 and m["support_top1"] >= 0.8
    assert resolve_weights(f"{run}@v2") == v.weights
    new_model, meta = load_for_inference(f"{run}@v2")
    old_model, _ = load_for_inference(f"{run}@v1")
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        a, b = old_model(x), new_model(x)
    assert (b[:, :7] - a).abs().max() <= 1e-6 * max(1.0, a.abs().max().item())
    from resforge.infer import predict
    rows = predict(f"{run}@v2", [str(support)], topk=1)
    right = [r["topk"][0]["label"] == Path(r["path"]).parent.name for r in rows if not r["error"]]
    assert len(right) == 18 and np.mean(right) >= 0.75     # 15 support images + one unseen per class


def test_new_version_exports_to_onnx_with_parity(base_run, added, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX parity needs onnxruntime (pip install resforge[onnx])")
    pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install resforge[onnx])")
    from resforge.export import export
    run, support, _ = base_run
    result = export(f"{run}@v2", "onnx", tmp_path / "v2.onnx", samples=[str(support)])
    assert result.top1_agreement == 1.0 and result.max_abs_diff <= result.limit


def _cli(*args, root: Path):
    env = {**os.environ, "PYTHONPATH": SRC, "RESFORGE_CACHE": str(root / "cache"), "RESFORGE_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "resforge.cli", "fewshot", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def _one_sentence(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resforge: error: "), proc.stderr
    return lines[0]


def test_cli_refusals_are_one_sentence(base_run, tmp_path):
    run, support, root = base_run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in _one_sentence(_cli(run, "--support", empty, root=root))
    few = tmp_path / "few"
    _write_pngs(few / "x", _digits()["train"]["images"][:3])
    _write_pngs(few / "y", _digits()["train"]["images"][3:9])
    assert "class 'x' has 3 images" in _one_sentence(_cli(run, "--support", few, "--shots", "5", root=root))
    clash = tmp_path / "clash"
    _write_pngs(clash / "3", _digits()["train"]["images"][:5])
    msg = _one_sentence(_cli(run, "--support", clash, root=root))
    assert "'3'" in msg and "already one of the model's classes" in msg
    assert [p.name for p in (run / "versions").iterdir()] == ["v1", "v2"]      # nothing written


def test_shots_outside_the_range_is_refused_in_process(base_run, capsys):
    from resforge.cli import main
    run, support, _ = base_run
    assert main(["fewshot", str(run), "--support", str(support), "--shots", "21"]) == 2
    assert "--shots 21 is outside 1..20" in capsys.readouterr().err


def test_rgb_support_images_are_converted_to_the_models_channels(base_run, added, tmp_path):
    run, _, _ = base_run
    s = _digits()["train"]
    rgb = tmp_path / "rgb"
    _write_pngs(rgb / "seven_rgb", s["images"][s["labels"] == 7][6:8], rgb=True)
    r = F.fewshot(f"{run}@v2", rgb, shots=2, say=lambda *_: None)
    assert r.version.class_names[-1] == "seven_rgb" and r.version.parent == 2
    assert r.version.record["method"]["shots"] == 2 and V.resolve_model(run)[1].number == 3


def test_finetune_epochs_train_only_the_head(base_run):
    from resforge.weights import read_state_dict
    run, support, _ = base_run
    r = F.fewshot(f"{run}@v1", support, shots=5, finetune_epochs=1, say=lambda *_: None)
    assert r.version.parent == 1 and r.version.record["method"]["finetune_epochs"] == 1
    before, _, _ = read_state_dict(run / "versions" / "v1" / "weights" / "best.safetensors")
    after, _, _ = read_state_dict(r.version.weights)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))   # backbone, BN stats
    assert after["fc.weight"].shape[0] == 10 and not torch.equal(after["fc.weight"][:7], before["fc.weight"])
    assert r.metrics["old_top1"] >= r.metrics["old_top1_before"] - 0.1


def test_shifted_views_stand_in_for_a_single_support_image():
    img = np.arange(2 * 16 * 16, dtype=np.uint8).reshape(2, 1, 16, 16)
    v = F.shifted_views(img)
    assert v.shape == (8, 1, 16, 16)
    assert np.array_equal(v[0][:, :, 1:], img[0][:, :, :-1])        # shifted right by 1 px, edge replicated
    assert np.array_equal(v[0][:, :, 0], img[0][:, :, 0])

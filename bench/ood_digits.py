"""How well the OOD flag separates unfamiliar images, on the embedded default run (issue 19, finding 5).

Trains the default recipe (`resforge train`: ResNet-20 on the 8x8 digits upsampled to 16x16,
8 epochs) unless --run names a finished run, then prints the MSP calibration of its test split
and, for every image set below written as PNG files and read back by `resforge.predict(...,
ood=True)` exactly as `resforge predict --ood` does, the fraction flagged (by the run's own score
and threshold) and the AUROC of both scores, msp (-log of the maximum softmax probability) and
energy (-logsumexp of the logits), against the real test digits (logits of the same files, through
the same preprocessing, resforge.infer.Preprocess):

    test digits        in distribution: about 1 - accept_rate (5%) flagged by design
    shuffled digits    each test digit's pixels permuted: same intensities, no strokes
    inverted digits    255 - x: dark strokes on a light background
    uniform noise      every pixel uniform in 0..255
    constant grey      one grey level per image, 0..255
    CIFAR-10 test      the first N test photos (--cifar), decoded to grey and resized by predict

    python bench/ood_digits.py [--run runs/x] [--cifar /path/cifar-10-binary.tar.xz] [--n 360] [key=value ...]

key=value: overrides of the digits recipe for the run trained (e.g. train.seed=1 eval.ood_score=energy).

About 1 minute on 2 cores (most of it reading CIFAR-10 out of its .tar.xz).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

import torch

import resforge
from resforge import ood
from resforge.pipeline import prepare_data
from resforge.checkpoint import load_for_inference
from resforge.config import load_config
from resforge.infer import Preprocess


def image_sets(run: Path, n: int, cifar: Path | None, rng) -> dict[str, np.ndarray]:
    """name -> (N, H, W) or (N, H, W, 3) uint8 images."""
    bundle, _ = prepare_data(load_config(None, None, base=json.loads((run / "config.json").read_text())))
    digits = np.asarray(bundle.splits["test"].images[:n])[:, 0]           # (N, H, W)
    h, w = digits.shape[1:]
    sets = {"test digits": digits,
            "shuffled digits": np.stack([rng.permutation(x.ravel()).reshape(h, w) for x in digits]),
            "inverted digits": 255 - digits,
            "uniform noise": rng.integers(0, 256, (n, h, w), dtype=np.uint8),
            "constant grey": np.repeat(np.linspace(0, 255, n).astype(np.uint8)[:, None, None], h * w, 1).reshape(n, h, w)}
    if cifar is not None:
        from resforge.data.cifar import read_cifar
        test = read_cifar(cifar)["splits"]["test"]
        sets["CIFAR-10 test"] = np.asarray(test["images"][:n]).transpose(0, 2, 3, 1)   # (N, 32, 32, 3)
    return sets


def score(run: Path, images: np.ndarray, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flagged by resforge.predict(ood=True), msp score, energy, max softmax probability) per image."""
    folder.mkdir(parents=True)
    files = []
    for i, x in enumerate(images):
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(x).save(files[-1])
    rows = resforge.predict(run, files, topk=1, ood=True, device="cpu", progress=False)
    model, meta = load_for_inference(run)
    prep = Preprocess(meta)
    with torch.inference_mode():
        logits = model(torch.from_numpy(prep.batch([prep.decode(str(f)) for f in files])))
    return (np.array([r["ood"] for r in rows]), ood.neg_log_msp(logits), ood.energy(logits),
            ood.softmax(logits).max(axis=1))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside image > score of an inside one): 0.5 = no separation."""
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder (default: train the default)")
    ap.add_argument("--cifar", type=Path, default=None, help="cifar-10-binary.tar.xz for the CIFAR-10 set")
    ap.add_argument("--n", type=int, default=360, help="images per set (default 360: the digits test split)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and shuffles (default 0)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the digits recipe (default: none)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    run = a.run or resforge.train("digits", ["train.progress=false", *a.overrides]).dir   # = `resforge train`
    report = json.loads((run / "report.json").read_text())
    cal, o = report["test"]["calibration"], report["ood"]
    print(f"\nrun {run}: test top-1 {report['test']['top1']:.4f}; MSP calibration on test: ECE {cal['ece']:.4f}, "
          f"mean confidence {cal['mean_confidence']:.4f}, accuracy {cal['accuracy']:.4f}")
    if o.get("threshold") is None:
        print(f"no OOD threshold: {o['why']}")
        return 1
    print(ood.describe(o) + "\n")
    sets = image_sets(run, a.n, a.cifar, np.random.default_rng(a.seed))
    print(f"{'images':<18} {'n':>5} {'flagged':>8} {'AUROC msp':>10} {'AUROC energy':>13} {'median MSP':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        scored = {k: score(run, v, Path(tmp) / str(i)) for i, (k, v) in enumerate(sets.items())}
    base = scored["test digits"]
    for name, (flag, msp_score, energy, msp) in scored.items():
        same = name == "test digits"
        print(f"{name:<18} {len(flag):>5} {flag.mean():>8.1%} {'-' if same else f'{auroc(base[1], msp_score):.3f}':>10} "
              f"{'-' if same else f'{auroc(base[2], energy):.3f}':>13} {np.median(msp):>11.3f}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

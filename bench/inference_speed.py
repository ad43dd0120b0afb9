"""Inference throughput on this CPU: eager PyTorch vs TorchScript vs ONNX Runtime, side by side.

Models: ResNet-18 at 128x128 and ResNet-20 at 32x32 (random weights: speed does not depend on
them), batch 1 and 64. Each artifact comes from resforge.export (so it passed the parity
check first). Backends are interleaved over rounds and the median per backend is reported,
because a shared machine's speed drifts; the ratios to eager are what matters.

    eager        resforge.backends.TorchBackend: inference_mode, channels_last
    eager-nchw   the same without channels_last (what a plain `model(x)` does)
    torchscript  traced + frozen TorchScript (torch.jit.load)
    onnxruntime  ONNX Runtime CPUExecutionProvider, default graph optimisations

    python bench/inference_speed.py [--seconds 2] [--rounds 3] [--threads N]

--threads sets torch's and ONNX Runtime's intra-op threads alike (default: each runtime's own
choice). On a shared/oversubscribed VM, torch's OpenMP threads can collapse (x10 slower at
2 threads than at 1) while other processes hold the cores: compare with --threads 1.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from resforge.backends import OnnxBackend, TorchBackend, TorchScriptBackend
from resforge.export import export_model
from resforge.models import create_model

CASES = [("resnet18", 128), ("resnet20", 32)]
BATCHES = [1, 64]


def images_per_second(fn, x: np.ndarray, seconds: float) -> float:
    fn(x)                                            # warm-up: primitive creation, allocations
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 2:
            return n * len(x) / elapsed


def backends_for(name: str, size: int, tmp: Path, threads: int | None) -> dict:
    model = create_model(name, num_classes=10).eval()
    meta = {"model": {"name": name, "num_classes": 10, "in_chans": 3, "kwargs": {}},
            "class_names": [str(i) for i in range(10)], "input_size": [3, size, size],
            "mean": [0.5] * 3, "std": [0.25] * 3}
    onnx = export_model(model, meta, "onnx", tmp / f"{name}.onnx").path
    ts = export_model(model, meta, "torchscript", tmp / f"{name}.torchscript").path
    return {"eager": TorchBackend(model, meta), "eager-nchw": TorchBackend(model, meta, channels_last=False),
            "torchscript": TorchScriptBackend(ts), "onnxruntime": OnnxBackend(onnx, threads=threads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every backend")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load avg {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in CASES:
            backends = backends_for(name, size, Path(tmp), a.threads)
            for batch in BATCHES:
                x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
                speeds = {k: [] for k in backends}
                for _ in range(a.rounds):
                    for k, fn in backends.items():
                        speeds[k].append(images_per_second(fn, x, a.seconds))
                rows.append((f"{name} @{size}", batch, {k: statistics.median(v) for k, v in speeds.items()}))
                print(f"  measured {name} @{size} batch {batch}", flush=True)
    names = list(rows[0][2])
    head = f"{'model':<16}{'batch':>6}" + "".join(f"{k:>13}" for k in names) + "   vs eager: ts / ort"
    print("\nimages/s (median of rounds)\n" + head + "\n" + "-" * len(head))
    for model, batch, s in rows:
        cells = "".join(f"{s[k]:>13.1f}" for k in names)
        print(f"{model:<16}{batch:>6}{cells}   {s['torchscript'] / s['eager']:.2f}x / {s['onnxruntime'] / s['eager']:.2f}x")
    print(f"load avg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

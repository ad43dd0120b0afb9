"""Int8 vs fp32 ONNX on CIFAR-10: test top-1, agreement and ONNX Runtime throughput, side by side.

Models (CIFAR-10, 32x32):
    resnet20, resnet56   the shared pretrained akamaster weights (pretrained/akamaster-*.th),
                         calibrated on and checked with the shared CIFAR-10 archive (--data)
    resnet18             the CIFAR variant (3x3 stem, no max-pool: recipe cifar10-resnet18's
                         model), trained briefly here (--resnet18-epochs on --resnet18-fraction
                         of the 50,000 training images; the run is kept in --out and reused), or
                         the run/weights named by --resnet18. A briefly trained net is far below
                         the recipe's 95%: its row measures quantisation, not the recipe.

For each: the fp32 ONNX export (parity-checked as every export) and `resforge export --int8`
(resforge.export with Int8Options: calibrated on --calibration training images, accuracy
checked on the full 10,000-image test set; written whatever the drop, so the figures always
come out; the verdict column applies --tolerance). Throughput: ONNX Runtime on the CPU with
intra-op threads = --threads (default: every core), batch 1 and 64 of real test images, fp32
and int8 interleaved over --rounds rounds of --seconds each, median reported.

    python bench/int8_speed.py [--shared /work/shared/data] [--out runs/bench-int8] [--quick]
    python bench/int8_speed.py --resnet18 runs/cifar10-resnet18      # a ResNet-18 trained elsewhere

--quick (a smoke test, not the figures): 128 calibration images, 1,000 test images, ResNet-18
trained on 2% of the training set, 1 round of 0.5 s. Without the shared data it says so and
exits with status 0 (nothing measured).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import images_per_second  # noqa: E402

BATCHES = (1, 64)
TARGET_SPEEDUP = 1.5


def shared_files(shared: Path) -> dict | None:
    """{"cifar": archive, "resnet20": file, "resnet56": file}, or None (with the reason printed)."""
    files = {"cifar": shared / "cifar-10-binary.tar.xz"}
    for arch in ("resnet20", "resnet56"):
        found = sorted((shared / "pretrained").glob(f"akamaster-{arch}-*.th")) if shared.is_dir() else []
        files[arch] = found[0] if found else shared / "pretrained" / f"akamaster-{arch}-*.th"
    missing = [str(p) for p in files.values() if not Path(p).is_file()]
    if missing:
        print(f"int8_speed: skipped, shared data not found: {', '.join(missing)} (pass --shared DIR or set "
              "RESFORGE_SHARED_DATA); nothing was measured")
        return None
    return files


def resnet18_run(a, cifar: Path) -> Path:
    """The briefly trained CIFAR ResNet-18 run (trained once, reused from --out afterwards)."""
    import resforge

    name = f"resnet18-e{a.resnet18_epochs}-f{a.resnet18_fraction:g}".replace(".", "p")
    run = a.out / "runs" / name
    if (run / "report.json").is_file():                # written when a run has finished
        print(f"reusing {run}", flush=True)
        return run
    print(f"training the CIFAR ResNet-18 for {a.resnet18_epochs} epoch(s) on {a.resnet18_fraction:.0%} of the "
          f"training images -> {run}", flush=True)
    # --quick scores the run on its own training images only: training's test evaluation of the
    # 10,000 images would take longer than the smoke test (the int8 check measures them anyway)
    resforge.train("cifar10-resnet18", [f"data.source={cifar}", f"data.train_fraction={a.resnet18_fraction}",
                                        f"train.epochs={a.resnet18_epochs}", "eval.tta=false",
                                        f"eval.splits=[{'train' if a.quick else 'test'}]",
                                        f"train.project={run.parent}", f"train.name={name}", "train.progress=false"])
    return run


def test_inputs(cifar: Path, meta: dict, n: int = 64) -> np.ndarray:
    """The first n CIFAR-10 test images, preprocessed as the model's inference does."""
    from resforge.data import load_source
    from resforge.infer import Preprocess

    bundle = load_source(str(cifar), image_size=tuple(meta["input_size"][1:]), channels=meta["input_size"][0])
    images = np.asarray(bundle.splits["test"].images[:n]).transpose(0, 2, 3, 1)
    return Preprocess(meta).batch(list(images))


def export_pair(label: str, source: Path, arch: str, data: Path | None, cifar: Path, a) -> dict:
    """fp32 and int8 ONNX of one model, and the int8 export's accuracy record."""
    from resforge.checkpoint import load_for_inference
    from resforge.api import export
    from resforge.export import export_model
    from resforge.quantize import Int8Options

    model, meta = load_for_inference(source, model_name=arch)
    inputs = test_inputs(cifar, meta)
    fp32 = export_model(model, meta, "onnx", a.out / f"{label}.onnx", inputs=inputs,
                        origin="CIFAR-10 test images").path
    opts = Int8Options(calibration=a.calibration, tolerance=100.0, check_images=a.check_images,
                       data=None if data is None else str(data))
    t0 = time.perf_counter()
    result = export(source, "onnx", a.out / f"{label}.int8.onnx", model_name=arch, int8=opts)
    print(result.summary(), flush=True)
    return {"label": label, "fp32": fp32, "int8": result.path, "q": result.quantization, "inputs": inputs,
            "export_s": time.perf_counter() - t0}


def throughput(pair: dict, threads: int, seconds: float, rounds: int) -> dict:
    """{batch: (fp32 images/s, int8 images/s)}, medians of interleaved rounds."""
    from resforge.backends import OnnxBackend

    backends = {k: OnnxBackend(pair[k], threads=threads) for k in ("fp32", "int8")}
    out = {}
    for batch in BATCHES:
        x = np.ascontiguousarray(np.resize(pair["inputs"], (batch, *pair["inputs"].shape[1:])))
        speeds = {k: [] for k in backends}
        for _ in range(rounds):
            for k, fn in backends.items():
                speeds[k].append(images_per_second(fn, x, seconds))
        out[batch] = tuple(statistics.median(speeds[k]) for k in ("fp32", "int8"))
    return out


def table(rows: list[dict], tolerance: float) -> str:
    head = (f"{'model':<10}{'n':>7}{'fp32 top1':>11}{'int8 top1':>11}{'diff':>8}{'agree':>8}{'MB fp32/int8':>14}"
            + "".join(f"{f'b{b} fp32':>10}{f'b{b} int8':>10}{'ratio':>7}" for b in BATCHES)
            + f"  within {tolerance:g} / >= {TARGET_SPEEDUP}x")
    lines = [head, "-" * len(head)]
    for r in rows:
        q, s = r["q"], r["speed"]
        diff = 100 * (q["int8_top1"] - q["fp32_top1"])
        mb = f"{r['fp32'].stat().st_size / 1e6:.1f}/{r['int8'].stat().st_size / 1e6:.1f}"
        cells = "".join(f"{s[b][0]:>10.1f}{s[b][1]:>10.1f}{s[b][1] / s[b][0]:>6.2f}x" for b in BATCHES)
        fast = all(s[b][1] / s[b][0] >= TARGET_SPEEDUP for b in BATCHES)
        lines.append(f"{r['label']:<10}{q['n']:>7}{100 * q['fp32_top1']:>10.2f}%{100 * q['int8_top1']:>10.2f}%"
                     f"{diff:>+8.2f}{100 * q['top1_agreement']:>7.2f}%{mb:>14}{cells}"
                     f"  {'yes' if -diff <= tolerance else 'NO'} / {'yes' if fast else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("RESFORGE_SHARED_DATA", "/work/shared/data")),
                   help="folder of the shared data (default: RESFORGE_SHARED_DATA, else /work/shared/data)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-int8"), help="artifacts and the ResNet-18 run")
    p.add_argument("--quick", action="store_true", help="a smoke test: fewer images, shorter timings")
    p.add_argument("--calibration", type=int, default=None, help="calibration images (default 512; --quick 128)")
    p.add_argument("--check-images", type=int, default=None, help="test images checked (default: all 10,000)")
    p.add_argument("--tolerance", type=float, default=0.5, help="top-1 points the verdict column allows")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--resnet18", type=Path, default=None, help="a ResNet-18 run folder to use instead of training one")
    p.add_argument("--resnet18-epochs", type=int, default=1)
    p.add_argument("--resnet18-fraction", type=float, default=None, help="of the training set (default 0.2; --quick 0.02)")
    p.add_argument("--models", default="resnet20,resnet56,resnet18", help="comma-separated subset")
    a = p.parse_args()
    quick = a.quick
    a.calibration = a.calibration or (128 if quick else 512)
    a.check_images = a.check_images or (1000 if quick else None)
    a.seconds, a.rounds = a.seconds or (0.5 if quick else 2.0), a.rounds or (1 if quick else 3)
    a.resnet18_fraction = a.resnet18_fraction or (0.02 if quick else 0.2)
    files = shared_files(a.shared)
    if files is None:
        return 0
    import onnxruntime
    import torch

    from resforge.evaluation import run_folder
    from resforge.weightfile import resolve_weights

    a.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; ORT threads {a.threads}; load avg {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for label in a.models.split(","):
        if label == "resnet18":
            source = a.resnet18 or resnet18_run(a, files["cifar"])
            data = None if run_folder(resolve_weights(source)) else files["cifar"]   # a run: its own data
            pair = export_pair(label, source, "resnet18", data, files["cifar"], a)
        else:
            pair = export_pair(label, files[label], label, files["cifar"], files["cifar"], a)
        pair["speed"] = throughput(pair, a.threads, a.seconds, a.rounds)
        rows.append(pair)
        print(f"  measured {label} (export + check {pair['export_s']:.0f}s)", flush=True)
    print(f"\nCIFAR-10 test top-1 and ONNX Runtime images/s (median of {a.rounds} interleaved rounds of {a.seconds:g} s, "
          f"{a.threads} threads, calibration {a.calibration} training images{', QUICK' if quick else ''})")
    print(table(rows, a.tolerance))
    print(f"load avg at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

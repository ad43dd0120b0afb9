"""CIFAR-10 speed benchmark (issue #3), in one run:

1. this machine's peak: matmul and 3x3-conv FLOP/s in fp32 and bf16, measured in-process;
2. a recipe (default cifar10-fast) trained for N seeds through `resforge.train`: mean +- std
   test accuracy, median wall time, images/s, achieved FLOP/s and its fraction of the peak
   of the precision the run used;
3. the seed's reference recipe (torchvision-layout ResNet-18, no augmentation, Adam 1e-3,
   batch 128) trained for the same wall time (train.max_seconds), accuracies side by side.

    python bench/cifar10_speed.py --data /path/to/cifar-10-binary.tar.xz --seeds 5
    python bench/cifar10_speed.py --data ... --recipe cifar10-resnet20 --seeds 1 --skip-reference
    python bench/cifar10_speed.py --data ... --peaks-only

Run it on an otherwise idle machine: the load average is printed before and after, because
other processes on the cores make every number here meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import resforge
from resforge.pipeline import build_model
from resforge.config import load_config
from resforge.training.device import cpu_has_native_bf16

# The seed project's recipe (README of issue #3): ResNet-18 in torchvision layout (7x7/2 stem +
# max-pool), ToTensor only (no flip/crop), Adam 1e-3 at a constant rate, batch 128.
# Differences kept on purpose: resforge's in-memory batches (not per-image loading) and
# per-channel normalisation, so the comparison isolates the recipe, not the loader.
REFERENCE = ["model.name=resnet18", "aug.flip=none", "aug.translate=0", "optim.name=adam",
             "optim.lr=0.001", "optim.weight_decay=0", "optim.schedule=constant",
             "optim.label_smoothing=0", "train.batch_size=128", "data.val_fraction=0",
             "eval.splits=[test]", "eval.tta=false", "train.restore_best=false"]


# ---------------------------------------------------------------- peak FLOP/s


def seconds_per_call(fn, min_seconds: float) -> float:
    """Mean wall time of fn() after one warm-up call, repeated for at least min_seconds."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt / n


def matmul_flops(dtype: torch.dtype, seconds: float = 1.0, sizes=(256, 512, 1024, 2048)) -> float:
    """Best FLOP/s of (n, n) @ (n, n) (2 n^3 FLOPs) over growing n; stops growing once one call
    takes over 0.25 s (emulated bf16 is ~100x slower than fp32 and would take minutes)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        per_call = seconds_per_call(lambda: a @ b, seconds / len(sizes))
        best = max(best, 2 * n ** 3 / per_call)
        if per_call > 0.25:
            break
    return best


def conv_flops(dtype: torch.dtype, batch: int = 32, ch: int = 128, hw: int = 16, seconds: float = 1.0) -> float:
    """3x3 'same' conv ch -> ch on (batch, ch, hw, hw), channels_last: 2 * B*H*W*Cout*Cin*9 FLOPs."""
    x = torch.randn(batch, ch, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(ch, ch, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return 2 * batch * hw * hw * ch * ch * 9 / seconds_per_call(lambda: F.conv2d(x, w, padding=1), seconds)


def measure_peaks(seconds: float) -> dict:
    """{"fp32": {"matmul": FLOP/s, "conv": FLOP/s, "peak": max}, "bf16": {...}}"""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        mm, cv = matmul_flops(dtype, seconds=seconds), conv_flops(dtype, seconds=seconds)
        out[name] = {"matmul": mm, "conv": cv, "peak": max(mm, cv)}
    return out


# ---------------------------------------------------------------- model cost


def train_flops_per_image(recipe: str, overrides: list[str], num_classes: int = 10,
                          in_chans: int = 3, hw: int = 32) -> float:
    """Forward + backward FLOPs of one training image (convolutions and matmuls, counted by
    torch's FlopCounterMode on a batch of 4; frozen layers' weight gradients are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = load_config(recipe, [o for o in overrides if not o.startswith("data.")])
    model = build_model(cfg, num_classes, in_chans)[0].train()
    x = torch.randn(4, in_chans, hw, hw)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return counter.get_total_flops() / 4


# ---------------------------------------------------------------- training runs


def run_once(recipe: str | None, overrides: list[str]) -> dict:
    """One `resforge.train` run -> accuracy, times and training images."""
    t0 = time.perf_counter()
    run = resforge.train(recipe, overrides)
    wall = time.perf_counter() - t0
    report = json.loads((run.dir / "report.json").read_text())
    n_train, bs = report["data"]["splits"]["train"], run.config.train.batch_size
    images = report["epochs_run"] * (n_train // bs if n_train > bs else 1) * min(bs, n_train)
    return {"dir": str(run.dir), "acc": run.results["test"]["top1"], "train_s": run.train_seconds,
            "wall_s": wall, "epochs": report["epochs_run"], "images": images,
            "img_s": images / max(run.train_seconds, 1e-9), "precision": _precision_of(run)}


def _precision_of(run) -> str:
    from resforge.training.device import make_runtime
    t = run.config.train
    return make_runtime(t.device, t.precision, t.channels_last).precision


def common_overrides(args, name: str) -> list[str]:
    out = [f"data.source={args.data}", "train.progress=false", f"train.project={args.project}",
           f"train.name={name}"]
    if args.cache_dir:
        out.append(f"data.cache_dir={args.cache_dir}")
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---------------------------------------------------------------- report


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
            f"native bf16: {cpu_has_native_bf16()}, {gpu}")


def load_line() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg() + f" on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def print_peaks(peaks: dict) -> None:
    for name, p in peaks.items():
        print(f"peak {name}: matmul {p['matmul'] / 1e9:8.1f} GFLOP/s   conv3x3 {p['conv'] / 1e9:8.1f} GFLOP/s")


def summarize(rows: list[dict], flops_img: float, peaks: dict | None) -> dict:
    accs = [r["acc"] for r in rows]
    m, s = mean_std(accs)
    img_s = statistics.median(r["img_s"] for r in rows)
    out = {"acc_mean": m, "acc_std": s, "n": len(rows), "train_s_median": statistics.median(r["train_s"] for r in rows),
           "wall_s_median": statistics.median(r["wall_s"] for r in rows), "img_s_median": img_s,
           "train_flops_per_image": flops_img, "achieved_flops": flops_img * img_s}
    if peaks:
        out["peak_flops"] = peaks[rows[0]["precision"] if rows[0]["precision"] in peaks else "fp32"]["peak"]
        out["fraction_of_peak"] = out["achieved_flops"] / out["peak_flops"]
    return out


def print_summary(label: str, s: dict) -> None:
    frac = f" = {100 * s['fraction_of_peak']:.1f}% of measured peak" if "fraction_of_peak" in s else ""
    print(f"{label}: test acc {100 * s['acc_mean']:.2f} +- {100 * s['acc_std']:.2f}% (n={s['n']})  "
          f"median train {s['train_s_median']:.1f}s, end-to-end {s['wall_s_median']:.1f}s  "
          f"{s['img_s_median']:.0f} img/s  {s['achieved_flops'] / 1e9:.1f} GFLOP/s "
          f"({s['train_flops_per_image'] / 1e9:.3f} GFLOP/img){frac}")


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("RESFORGE_CIFAR10", "cifar10"),
                   help="CIFAR-10 archive/folder, or 'cifar10' (looked up under RESFORGE_DATA)")
    p.add_argument("--recipe", default="cifar10-fast")
    p.add_argument("--seeds", type=int, default=3, help="runs of the recipe (seeds 0..N-1)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs of the recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    p.add_argument("--reference-budget", type=float, default=None,
                   help="seconds for the reference recipe (default: the recipe's median training time)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="time per peak measurement")
    p.add_argument("--peaks-only", action="store_true")
    p.add_argument("--project", default="runs/bench-cifar10-speed", help="folder for the run folders")
    p.add_argument("--cache-dir", default=None, help="decoded-tensor cache (default RESFORGE_CACHE)")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(machine_line())
    print(load_line())
    peaks = measure_peaks(args.peak_seconds)
    print_peaks(peaks)
    out = {"machine": machine_line(), "load_before": load_line(), "peaks": peaks}
    if args.peaks_only:
        return _finish(args, out)
    extra = ([f"train.epochs={args.epochs}"] if args.epochs else []) + list(args.set)
    flops_img = train_flops_per_image(args.recipe, extra)
    rows = []
    for seed in range(args.seeds):
        rows.append(run_once(args.recipe, common_overrides(args, f"{args.recipe}-s{seed}") + extra
                             + [f"train.seed={seed}"]))
        r = rows[-1]
        print(f"  seed {seed}: test acc {100 * r['acc']:.2f}%  train {r['train_s']:.1f}s  "
              f"end-to-end {r['wall_s']:.1f}s  {r['img_s']:.0f} img/s  ({r['epochs']} epochs, {r['precision']})",
              flush=True)
    out["recipe"] = {"name": args.recipe, "overrides": extra, "runs": rows,
                     "summary": summarize(rows, flops_img, peaks)}
    print_summary(args.recipe, out["recipe"]["summary"])
    if not args.skip_reference:
        out["reference"] = run_reference(args, out["recipe"]["summary"]["train_s_median"], peaks)
        print_side_by_side(args.recipe, out["recipe"]["summary"], out["reference"])
    out["load_after"] = load_line()
    print(out["load_after"])
    return _finish(args, out)


def run_reference(args, recipe_seconds: float, peaks: dict) -> dict:
    budget = args.reference_budget or recipe_seconds
    overrides = REFERENCE + common_overrides(args, "reference") + [
        "train.epochs=1000", f"train.max_seconds={budget}"]        # constant rate: the budget ends it
    row = run_once(None, overrides)
    flops_img = train_flops_per_image(None, REFERENCE)
    print(f"  reference: test acc {100 * row['acc']:.2f}%  train {row['train_s']:.1f}s "
          f"(budget {budget:.0f}s, {row['epochs']} epochs)  {row['img_s']:.0f} img/s")
    return {"budget_s": budget, "overrides": overrides, "runs": [row],
            "summary": summarize([row], flops_img, peaks)}


def print_side_by_side(recipe: str, fast: dict, reference: dict) -> None:
    ref = reference["summary"]
    print(f"\nrecipe: median {fast['train_s_median']:.0f}s of training; reference: budget "
          f"{reference['budget_s']:.0f}s, ran {ref['train_s_median']:.0f}s (whole epochs)")
    print(f"  {recipe:<24} {100 * fast['acc_mean']:6.2f}%  ({fast['img_s_median']:.0f} img/s)")
    print(f"  {'seed reference recipe':<24} {100 * ref['acc_mean']:6.2f}%  ({ref['img_s_median']:.0f} img/s)")


def _finish(args, out: dict) -> int:
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"saved: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

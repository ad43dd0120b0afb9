"""Class-incremental Split CIFAR-10 (5 tasks x 2 classes) through `resforge update`, and a domain shift.

Every method runs the real pipeline: task 1 is one `resforge.train` run per seed; each method
then chains four `resforge.update`s from that run's v1 (RUN@v1 -> v2 -> ... -> v5, branching per
method), so every method starts from the same task-1 model and sees the same data, backbone,
epochs, optimiser and seed. Joint training (the upper bound) is one `resforge.train` on all ten
classes for the same epochs. Figures, from the final version's update report:
    final average accuracy   mean over the 5 tasks' test splits of the final model's top-1,
                             predicting among all 10 classes (class-IL)
    average forgetting       Chaudhry et al. 2018, over tasks 1-4 (report.json "forgetting")
reported as mean +- sd over seeds. Published anchors (Buzzega et al. 2020, reduced ResNet-18,
50 epochs per task, class-IL): naive 19.62, ER 44.79 / 57.74 (buffer 200 / 500), DER++ 64.88 /
72.70, joint 92.20; the budget here is ~1/100 of theirs, so compare methods with each other.

    python bench/continual_split_cifar.py --plan              # time a few steps, print the plan, stop
    python bench/continual_split_cifar.py                     # the whole benchmark (<= --budget-min)
    python bench/continual_split_cifar.py --smoke             # ~1 minute: tiny subsets, 1 epoch, 1 seed
    python bench/continual_split_cifar.py --domain            # clean CIFAR-10 -> corrupted (blur, noise,
                                                              # contrast, JPEG): clean test before/after

Data: --data (default $RESFORGE_SHARED_DATA/cifar-10-binary.tar.xz). Outputs under --out
(default runs/bench-continual): the task .npz files, every run and version, results.json, results.md.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import resforge
from resforge.continual.update import update
from resforge.data import load_source

TASKS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
METHODS = ["naive", "replay", "lwf", "derpp", "derpp+align"]
ANCHORS = {"naive": "19.62", "replay@200": "44.79", "replay@500": "57.74", "derpp@200": "64.88",
           "derpp@500": "72.70", "joint": "92.20"}
# One recipe for every task and method: airbench94 (the fastest resforge net on CPU) with its
# cifar10-fast-short optimiser at batch 128 / lr 0.2 instead of 512 / 0.75: a CPU budget leaves few
# images per task, and at batch 512 that is 2 steps an epoch (task 1, 1,000 images, 4 epochs: test
# top-1 0.36 on 2 classes; batch 128, lr 0.2, 3 epochs: 0.78, measured on this machine). No TTA.
RECIPE = "cifar10-fast-short"
COMMON = ["train.progress=false", "eval.tta=false", "data.val_fraction=0", "eval.splits=[test]",
          "train.batch_size=128", "optim.lr=0.2"]


# ---------------------------------------------------------------- data

def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def write_tasks(archive: Path, out: Path, per_class_train: int | None, per_class_test: int | None) -> dict:
    """task{1..5}.npz (2 classes each, train + test) and all.npz (10 classes) from the CIFAR archive."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {f"task{t + 1}": out / f"task{t + 1}.npz" for t in range(5)} | {"all": out / "all.npz"}
    if all(p.is_file() for p in paths.values()):
        return paths
    b = load_source(str(archive))
    names = b.class_names
    tr, te = b.splits["train"], b.splits["test"]

    def pick(split, classes, cap):
        idx = np.concatenate([np.flatnonzero(split.labels == c)[:cap] for c in classes])
        return np.asarray(split.images[idx]), split.labels[idx]
    for t, classes in enumerate(TASKS):
        xtr, ytr = pick(tr, classes, per_class_train)
        xte, yte = pick(te, classes, per_class_test)
        np.savez(paths[f"task{t + 1}"], train_images=_nhwc(xtr), train_labels=np.searchsorted(classes, ytr),
                 test_images=_nhwc(xte), test_labels=np.searchsorted(classes, yte),
                 class_names=np.array([names[c] for c in classes]))
    xtr, ytr = pick(tr, range(10), per_class_train)
    xte, yte = pick(te, range(10), per_class_test)
    np.savez(paths["all"], train_images=_nhwc(xtr), train_labels=ytr, test_images=_nhwc(xte), test_labels=yte,
             class_names=np.array(names))
    return paths


def corrupt(images: np.ndarray, seed: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> the same images, each under one of four corruptions (cycled):
    Gaussian blur (sigma 1.2), Gaussian noise (sd 0.08), contrast x0.4, JPEG quality 15."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for i, im in enumerate(images):
        kind = i % 4
        if kind == 0:
            out[i] = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.2)))
        elif kind == 1:
            out[i] = np.clip(im / 255.0 + rng.normal(0, 0.08, im.shape), 0, 1) * 255
        elif kind == 2:
            m = im.mean(axis=(0, 1), keepdims=True)
            out[i] = np.clip((im - m) * 0.4 + m, 0, 255)
        else:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=15)
            out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def write_domain(paths: dict, out: Path) -> Path:
    p = out / "corrupted.npz"
    if not p.is_file():
        a = np.load(paths["all"])
        np.savez(p, train_images=corrupt(a["train_images"], 0), train_labels=a["train_labels"],
                 test_images=corrupt(a["test_images"], 1), test_labels=a["test_labels"], class_names=a["class_names"])
    return p


# ---------------------------------------------------------------- timing and plan

TIMING_PER_CLASS = 500          # images per class of the timing runs (1,000 per task)


def plan(archive: Path, out: Path, budget_s: float, seeds: int, configs: list[tuple[str, int]]) -> dict:
    """Time one epoch of task 1 and one derpp update epoch on 1,000-image tasks, then size the
    benchmark to `budget_s`: as many epochs per task as fit on the full tasks (10,000 training
    images each), else 1 epoch on the largest per-class subset that fits. Cost model per seed:
    task 1 once, 4 updates per config (naive ~0.55x and lwf ~0.7x a buffer method's step cost:
    no replayed half-batch), joint on 5 tasks' images; seconds per image measured, so start-up
    and evaluation are counted too (conservative: they do not grow with the images)."""
    small = write_tasks(archive, out / "data-timing", TIMING_PER_CLASS, 200)
    t0 = time.perf_counter()
    r = resforge.train(RECIPE, [f"data.source={small['task1']}", "train.epochs=1", f"train.project={out / 'timing'}",
                                *COMMON])
    task1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    update(r.dir, small["task2"], method="derpp", overrides=["train.epochs=1", *COMMON[:1], *COMMON[4:]], buffer_size=200)
    upd = time.perf_counter() - t0
    n = 2 * TIMING_PER_CLASS
    factor = {"naive": 0.55, "lwf": 0.7, "replay": 1.0, "derpp": 1.0}
    per_image_epoch = seeds * (task1 / n * 6                              # task 1 + joint (5 tasks)
                               + sum(4 * upd / n * factor[m.split("+")[0]] for m, _ in configs))
    full = 10_000
    epochs = int(budget_s // (per_image_epoch * full))
    per_class = 5000
    if epochs < 1:
        epochs, per_class = 1, max(100, int(budget_s / per_image_epoch / 2) // 100 * 100)
    return {"seconds_task1_epoch_1k": round(task1, 1), "seconds_update_epoch_1k_derpp": round(upd, 1),
            "epochs": epochs, "per_class_train": min(per_class, 5000),
            "estimated_minutes": round(epochs * per_image_epoch * 2 * min(per_class, 5000) / 60, 1),
            "budget_minutes": budget_s / 60}


# ---------------------------------------------------------------- runs

def run_split(paths: dict, out: Path, epochs: int, seeds: list[int], configs: list[tuple[str, int]],
              joint: bool) -> dict:
    res: dict[str, list[dict]] = {}
    for seed in seeds:
        base = resforge.train(RECIPE, [f"data.source={paths['task1']}", f"train.epochs={epochs}",
                                       f"train.seed={seed}", f"train.project={out / 'runs'}",
                                       f"train.name=task1-s{seed}", *COMMON]).dir
        for method, buf in configs:
            name, align = method.split("+")[0], method.endswith("+align")
            model, rep = f"{base}@v1", None
            for t in range(2, 6):
                u = update(model, paths[f"task{t}"], method=name, align=align or None, buffer_size=buf,
                           overrides=[f"train.epochs={epochs}", f"train.seed={seed}", "train.progress=false"])
                model, rep = u.version.dir, u.report
            final = [rep["accuracy"][f"d{j}"]["top1"] for j in range(1, 6) if f"d{j}" in rep["accuracy"]]
            key = f"{method}@{buf}" if name in ("replay", "derpp") else method
            res.setdefault(key, []).append({"seed": seed, "accuracy": 100 * float(np.mean(final)),
                                            "forgetting": 100 * rep["forgetting"], "per_task": final,
                                            "version": str(model)})
            print(f"  seed {seed} {key:<20} final avg acc {res[key][-1]['accuracy']:.2f}  "
                  f"forgetting {res[key][-1]['forgetting']:.2f}", flush=True)
        if joint:
            j = resforge.train(RECIPE, [f"data.source={paths['all']}", f"train.epochs={epochs}", f"train.seed={seed}",
                                        f"train.project={out / 'runs'}", f"train.name=joint-s{seed}", *COMMON])
            res.setdefault("joint", []).append({"seed": seed, "accuracy": 100 * j.results["test"]["top1"],
                                                "forgetting": None})
            print(f"  seed {seed} joint                final avg acc {res['joint'][-1]['accuracy']:.2f}", flush=True)
    return res


def run_domain(paths: dict, corrupted: Path, out: Path, epochs: int, seeds: list[int],
               configs: list[tuple[str, int]]) -> dict:
    res: dict[str, list[dict]] = {}
    for seed in seeds:
        base = resforge.train(RECIPE, [f"data.source={paths['all']}", f"train.epochs={epochs}", f"train.seed={seed}",
                                       f"train.project={out / 'runs'}", f"train.name=clean-s{seed}", *COMMON]).dir
        for method, buf in configs:
            name = method.split("+")[0]
            u = update(f"{base}@v1", corrupted, method=name, buffer_size=buf,
                       overrides=[f"train.epochs={epochs}", f"train.seed={seed}", "train.progress=false"])
            r = u.report
            key = f"{name}@{buf}" if name in ("replay", "derpp") else name
            res.setdefault(key, []).append({"seed": seed, "clean_before": 100 * r["old_top1_before"],
                                            "clean_after": 100 * r["old_top1"], "corrupted_after": 100 * r["new_top1"]})
            e = res[key][-1]
            print(f"  seed {seed} {key:<12} clean {e['clean_before']:.2f} -> {e['clean_after']:.2f}  "
                  f"corrupted {e['corrupted_after']:.2f}", flush=True)
    return res


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(res: dict) -> str:
    lines = ["| method | final avg accuracy (%) | average forgetting (%) | seeds | Buzzega et al. 2020 |",
             "|---|---|---|---|---|"]
    for key, rows in res.items():
        lines.append(f"| {key} | {_ms([r['accuracy'] for r in rows])} | {_ms([r['forgetting'] for r in rows])} "
                     f"| {len(rows)} | {ANCHORS.get(key.replace('+align', ''), '-') if '+align' not in key else '-'} |")
    return "\n".join(lines)


def domain_table(res: dict) -> str:
    lines = ["| method | clean test before (%) | clean test after (%) | corrupted test after (%) |", "|---|---|---|---|"]
    for key, rows in res.items():
        lines.append(f"| {key} | {_ms([r['clean_before'] for r in rows])} | {_ms([r['clean_after'] for r in rows])} "
                     f"| {_ms([r['corrupted_after'] for r in rows])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(os.environ.get("RESFORGE_SHARED_DATA", "../shared/data"))
                                         / "cifar-10-binary.tar.xz"))
    p.add_argument("--out", default="runs/bench-continual")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--buffers", default="200,500")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", default="auto", help="epochs per task, or auto: what fits --budget-min")
    p.add_argument("--budget-min", type=float, default=60.0)
    p.add_argument("--per-class", type=int, default=None,
                   help="training images per class and task (default: all 5,000, or what fits the budget)")
    p.add_argument("--plan", action="store_true", help="time, print the plan and stop")
    p.add_argument("--smoke", action="store_true",
                   help="proves it runs: tiny subsets, 1 epoch, 1 seed, naive/replay/derpp+align, buffer 200 (~1.5 min)")
    p.add_argument("--domain", action="store_true", help="the domain-shift benchmark instead")
    a = p.parse_args(argv)
    out = Path(a.out) / ("smoke" if a.smoke else "full")
    os.environ.setdefault("RESFORGE_THREADS", str(os.cpu_count() or 1))
    buffers = [200] if a.smoke else [int(b) for b in a.buffers.split(",")]
    methods = ["naive", "replay", "derpp+align"] if a.smoke else a.methods.split(",")
    configs = [(m, b) for m in methods for b in (buffers if m.split("+")[0] in ("replay", "derpp") else [0])]
    configs = [(m, b if b else 200) for m, b in configs]   # naive/lwf keep a buffer too (200), unused in training
    seeds = list(range(1 if a.smoke else a.seeds))
    per_class = 60 if a.smoke else a.per_class
    if a.smoke:
        epochs = 1
    elif a.epochs == "auto" or a.plan:
        pl = plan(Path(a.data), out, a.budget_min * 60, len(seeds), configs)
        print(f"plan: airbench94 ({RECIPE}), {pl['epochs']} epoch(s) per task on {pl['per_class_train']} training "
              f"images per class, {len(seeds)} seeds, {len(configs)} method/buffer configs + joint; measured on "
              f"1,000-image tasks: task-1 epoch {pl['seconds_task1_epoch_1k']} s, derpp update epoch "
              f"{pl['seconds_update_epoch_1k_derpp']} s -> about {pl['estimated_minutes']} min "
              f"(budget {pl['budget_minutes']:.0f} min)", flush=True)
        if a.plan:
            return 0
        epochs = pl["epochs"] if a.epochs == "auto" else int(a.epochs)
        per_class = per_class or pl["per_class_train"]
    else:
        epochs = int(a.epochs)
    per_class = per_class or 5000
    paths = write_tasks(Path(a.data), out / f"data-{per_class}", per_class, 30 if a.smoke else None)
    t0 = time.perf_counter()
    if a.domain:
        res = run_domain(paths, write_domain(paths, paths["all"].parent), out, epochs, seeds, configs)
        text = domain_table(res)
    else:
        res = run_split(paths, out, epochs, seeds, configs, joint=True)
        text = table(res)
    minutes = (time.perf_counter() - t0) / 60
    head = (f"{'Domain shift (clean CIFAR-10 -> corrupted)' if a.domain else 'Split CIFAR-10, class-incremental'}: "
            f"airbench94, {epochs} epoch(s) per task on {per_class} training images per class, seeds {seeds}, "
            f"{minutes:.1f} min on {os.cpu_count()} cores"
            f"{' (SMOKE: 60 train / 30 test images per class)' if a.smoke else ''}")
    print(head + "\n" + text)
    (out / ("domain.json" if a.domain else "results.json")).write_text(json.dumps(
        {"epochs": epochs, "seeds": seeds, "minutes": minutes, "results": res}, indent=1))
    (out / ("domain.md" if a.domain else "results.md")).write_text(head + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
METHODS = ["naive", "replay", "lwf", "derpp", "derpp+align", "replay+align"]
ANCHORS = {"naive": "19.62", "replay@200": "44.79", "replay@500": "57.74", "derpp@200": "64.88",
           "derpp@500": "72.70", "joint": "92.20"}
# One recipe for every task and method: airbench94 (the fastest resforge net on CPU) with its
# cifar10-fast-short optimiser, no TTA (plain single-view evaluation for every figure).
RECIPE = "cifar10-fast-short"
COMMON = ["train.progress=false", "eval.tta=false", "data.val_fraction=0", "eval.splits=[test]"]


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

def plan(paths: dict, out: Path, budget_s: float, seeds: int, configs: list[tuple[str, int]]) -> dict:
    """Time one epoch of task 1 (10 k images) and an update epoch, then pick epochs per task so the
    whole benchmark fits `budget_s`. Cost model per seed: task 1 once, 4 updates per config (x2 images
    per step for buffer methods, x1.3 for lwf's teacher), joint on 50 k images; plus evaluation."""
    t0 = time.perf_counter()
    r = resforge.train(RECIPE, [f"data.source={paths['task1']}", "train.epochs=1", f"train.project={out / 'timing'}",
                                *COMMON])
    one = time.perf_counter() - t0                         # includes start-up and evaluation: conservative
    n1 = 10_000
    t0 = time.perf_counter()
    update(r.dir, paths["task2"], method="derpp", overrides=["train.epochs=1", *COMMON[:1]], buffer_size=200)
    upd = time.perf_counter() - t0
    per_epoch = one / n1                                   # seconds per training image, task 1
    upd_img = upd / n1                                     # seconds per new image for a buffer method
    factor = {"naive": 0.55, "lwf": 0.7, "replay": 1.0, "derpp": 1.0}
    cost1 = seeds * (n1 * per_epoch                              # task 1 per seed
                     + sum(4 * n1 * upd_img * factor[m.split("+")[0]] for m, _ in configs)
                     + 5 * n1 * per_epoch)                        # joint: 50 k images
    epochs = max(1, int(budget_s // cost1))
    return {"seconds_task1_epoch": round(one, 1), "seconds_update_epoch_derpp": round(upd, 1),
            "epochs": epochs, "estimated_minutes": round(epochs * cost1 / 60, 1), "budget_minutes": budget_s / 60}


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
    p.add_argument("--plan", action="store_true", help="time, print the plan and stop")
    p.add_argument("--smoke", action="store_true",
                   help="proves it runs: tiny subsets, 1 epoch, 1 seed, naive/replay/derpp+align, buffer 200 (~1.5 min)")
    p.add_argument("--domain", action="store_true", help="the domain-shift benchmark instead")
    a = p.parse_args(argv)
    out = Path(a.out) / ("smoke" if a.smoke else "full")
    os.environ.setdefault("RESFORGE_THREADS", str(os.cpu_count() or 1))
    paths = write_tasks(Path(a.data), out / "data", 60 if a.smoke else None, 30 if a.smoke else None)
    buffers = [200] if a.smoke else [int(b) for b in a.buffers.split(",")]
    methods = ["naive", "replay", "derpp+align"] if a.smoke else a.methods.split(",")
    configs = [(m, b) for m in methods for b in (buffers if m.split("+")[0] in ("replay", "derpp") else [0])]
    configs = [(m, b if b else 200) for m, b in configs]   # naive/lwf keep a buffer too (200), unused in training
    seeds = list(range(1 if a.smoke else a.seeds))
    if a.smoke:
        epochs = 1
    elif a.epochs == "auto" or a.plan:
        pl = plan(paths, out, a.budget_min * 60, len(seeds), configs)
        print(f"plan: airbench94 ({RECIPE}), {pl['epochs']} epoch(s) per task, {len(seeds)} seeds, "
              f"{len(configs)} method/buffer configs + joint; task-1 epoch {pl['seconds_task1_epoch']} s, derpp "
              f"update epoch {pl['seconds_update_epoch_derpp']} s -> about {pl['estimated_minutes']} min "
              f"(budget {pl['budget_minutes']:.0f} min)", flush=True)
        if a.plan:
            return 0
        epochs = pl["epochs"] if a.epochs == "auto" else int(a.epochs)
    else:
        epochs = int(a.epochs)
    t0 = time.perf_counter()
    if a.domain:
        res = run_domain(paths, write_domain(paths, out / "data"), out, epochs, seeds, configs)
        text = domain_table(res)
    else:
        res = run_split(paths, out, epochs, seeds, configs, joint=True)
        text = table(res)
    minutes = (time.perf_counter() - t0) / 60
    head = (f"{'Domain shift (clean CIFAR-10 -> corrupted)' if a.domain else 'Split CIFAR-10, class-incremental'}: "
            f"airbench94, {epochs} epoch(s) per task, seeds {seeds}, {minutes:.1f} min on {os.cpu_count()} cores"
            f"{' (SMOKE: 60 train / 30 test images per class)' if a.smoke else ''}")
    print(head + "\n" + text)
    (out / ("domain.json" if a.domain else "results.json")).write_text(json.dumps(
        {"epochs": epochs, "seeds": seeds, "minutes": minutes, "results": res}, indent=1))
    (out / ("domain.md" if a.domain else "results.md")).write_text(head + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

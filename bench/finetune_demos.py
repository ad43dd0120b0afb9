"""The three transfer demonstrations of issue #4, one command each (resumable: finished runs
are read back from their report.json, not run again).

    # 1. ResNet-18 (ImageNet layout) from scratch on Imagenette at 128 px: val accuracy and time
    python bench/finetune_demos.py 1 --shared /work/shared/data --out runs/demos
    # 2. that checkpoint fine-tuned on BreastMNIST with every policy vs from scratch (3 seeds)
    python bench/finetune_demos.py 2 --shared /work/shared/data --out runs/demos
    # 3. the Imagenette checkpoint and the akamaster CIFAR-10 ResNet-56 on 1% / 10% of CIFAR-10
    python bench/finetune_demos.py 3 --shared /work/shared/data --out runs/demos
    # all three, or a minutes-long miniature of each (proves the commands, numbers meaningless)
    python bench/finetune_demos.py all --shared /work/shared/data --out runs/demos
    python bench/finetune_demos.py all --mini --shared /work/shared/data --out /tmp/demos-mini

Tables are printed and appended to OUT/demos.md (numbers also in OUT/demos.json). Every
fine-tuning run writes its own before/after report (report.md, comparison.png) under OUT.
Run on an otherwise idle machine: the load average is printed, as timings depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tarfile
import time
from pathlib import Path

import resforge
from resforge.finetune import finetune

POLICIES = ["linear-probe", "last-stages:2", "full", "gradual", "bitfit", "lora"]
ANCHORS = {"ResNet-18 (28 px)": (0.863, 0.901), "ResNet-50 (224 px)": (0.842, 0.866)}   # MedMNIST v2 test ACC/AUC
TARGET = (0.87, 0.91)


# ---------------------------------------------------------------- helpers

def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _finished(project: Path, name: str) -> dict | None:
    report = project / name / "report.json"
    return json.loads(report.read_text()) if report.is_file() else None


def _say(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "demos.md", "a") as f:
        f.write(text + "\n")


def _record(out: Path, key: str, value) -> None:
    path = out / "demos.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _extract(tar: Path, dest: Path) -> Path:
    """imagenette-128.tar -> dest/imagenette-128 (once; the shared copy stays read-only)."""
    folder = dest / "imagenette-128"
    if not (folder / "train").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        print(f"extracting {tar} -> {dest}", flush=True)
        with tarfile.open(tar) as t:
            t.extractall(dest, filter="data")          # "data": no absolute paths, links or devices
    return folder


def _ft_row(report: dict, key: str = "c") -> dict:
    return next(r for r in report["comparison"]["rows"] if r["key"] == key)


def _finetune(project: Path, name: str, source, data: str, policy: str, recipe: str, overrides: list[str]) -> dict:
    """Run (or read back) one fine-tuning run; -> its report.json."""
    done = _finished(project, name)
    if done is not None:
        print(f"{name}: finished earlier, read from {project / name / 'report.json'}", flush=True)
        return done
    run = finetune(source, data=data, policy=policy, recipe=recipe,
                   overrides=[f"train.project={project}", f"train.name={name}", "train.progress=false", *overrides])
    return json.loads((run.dir / "report.json").read_text())


# ---------------------------------------------------------------- 1. pretraining

def demo1(a) -> Path:
    project = a.out
    name = "imagenette-resnet18"
    folder = _extract(a.shared / "imagenette-128.tar", a.out / "data")
    report = _finished(project, name)
    if report is None:
        extra = ["data.train_fraction=0.03", "data.image_size=32", "train.epochs=1"] if a.mini else []
        if a.epochs1:
            extra.append(f"train.epochs={a.epochs1}")
        if a.side and not a.mini:
            extra.append(f"data.image_size={a.side}")
        resforge.train("pretrain-imagenette", [f"data.source={folder}", f"train.project={project}",
                                               f"train.name={name}", "train.progress=false", *extra])
        report = _finished(project, name)
    row = [name, report["val"]["n"], f"{report['val']['top1']:.4f}", f"{report['test']['top1']:.4f}",
           report["best_epoch"], report["epochs_run"], f"{report['train_seconds'] / 60:.1f} min"]
    side = json.loads((project / name / "weights" / "best.json").read_text()).get("input_size", [0, "?"])[-1]
    _say(a.out, f"\n## 1. ResNet-18 from scratch on Imagenette ({side} px)   (load {_load()})\n\n"
         + _table(["run", "val n", "val top-1", "test top-1 (carved from train)", "best epoch", "epochs",
                   "train time"], [row]))
    _record(a.out, "imagenette", {"val_top1": report["val"]["top1"], "test_top1": report["test"]["top1"],
                                  "train_seconds": report["train_seconds"], "epochs": report["epochs_run"]})
    return project / name


# ---------------------------------------------------------------- 2. BreastMNIST

def demo2(a, ckpt: Path) -> None:
    data = str(a.shared / "breastmnist.npz")
    seeds = range(1 if a.mini else a.seeds)
    mini = ["train.epochs=1", "finetune.probe_epochs=2", "finetune.input_size=32"] if a.mini else []
    if a.side and not a.mini:       # the recipe's 8-px translate is for 128 px inputs: scale it
        mini += [f"finetune.input_size={a.side}", f"aug.translate={max(1, round(8 * a.side / 128))}"]
    policies = [p for p in POLICIES if p != "lora" or _has_peft()]
    results: dict[str, list[dict]] = {}
    for policy in policies + ["scratch"]:
        for seed in seeds:
            tag = policy.replace(":", "")
            name = f"breast-{tag}-s{seed}"
            if policy == "scratch":      # the control: same pipeline, random init, a scratch learning rate
                rep = _finetune(a.out, name, "scratch:resnet18", data, "full", "finetune-breastmnist",
                                [f"train.seed={seed}", "finetune.head_init=fresh", "finetune.compare=false",
                                 f"optim.lr={a.scratch_lr}", f"train.epochs={a.scratch_epochs}", *mini])
            else:
                rep = _finetune(a.out, name, ckpt, data, policy, "finetune-breastmnist", [f"train.seed={seed}", *mini])
            results.setdefault(policy, []).append(rep)
    rows, record = [], {}
    prototype = [_ft_row(r, "a") for r in results[policies[0]]]
    rows.append(_breast_row("(a) prototype head, no training", prototype))
    for policy, reps in results.items():
        label = "from scratch (ResNet-18, same input)" if policy == "scratch" else policy
        rows.append(_breast_row(label, [_ft_row(r) for r in reps]))
        cs = [_ft_row(r) for r in reps]
        record[policy] = {"acc": [c["top1"] for c in cs], "auc": [c["auc"] for c in cs]}
    anchors = "; ".join(f"{k}: ACC {v[0]} / AUC {v[1]}" for k, v in ANCHORS.items())
    _say(a.out, f"\n## 2. BreastMNIST (546 train / 78 val / 156 test), {len(seeds)} seed(s)   (load {_load()})\n\n"
         + _table(["method", "test ACC (mean ± sd)", "test AUC (mean ± sd)", "train time (mean)", "trainable params",
                   f"ACC ≥ {TARGET[0]} and AUC ≥ {TARGET[1]}"], rows)
         + f"\n\nMedMNIST v2 anchors: {anchors}.")
    _record(a.out, "breastmnist", record)


def _breast_row(label: str, cs: list[dict]) -> list[str]:
    acc, auc = [c["top1"] for c in cs], [c["auc"] for c in cs]
    ok = statistics.mean(acc) >= TARGET[0] and statistics.mean(auc) >= TARGET[1]
    gap = "yes" if ok else f"no (ACC {statistics.mean(acc) - TARGET[0]:+.3f}, AUC {statistics.mean(auc) - TARGET[1]:+.3f})"
    return [label, _mean_sd(acc), _mean_sd(auc), f"{statistics.mean(c['train_seconds'] for c in cs):.0f} s",
            f"{cs[0]['trainable_params']:,}", gap]


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
        return True
    except ImportError:
        print("peft not installed: the lora policy is skipped (pip install 'resforge[peft]')", flush=True)
        return False


# ---------------------------------------------------------------- 3. CIFAR-10 subsets

def demo3(a, ckpt: Path) -> None:
    data = str(a.shared / "cifar-10-binary.tar.xz")
    aka = "resnet20" if a.mini else "resnet56"
    aka_file = next((a.shared / "pretrained").glob(f"akamaster-{aka}-*.th"))
    sources = [("imagenette-resnet18", ckpt, "resnet18", 32 if a.mini else a.side or 128),
               (f"akamaster-{aka}", aka_file, aka, 32)]
    fractions = [0.002] if a.mini else [0.01, 0.1]
    mini = ["train.epochs=1", "finetune.probe_epochs=2"] if a.mini else []
    rows, record = [], {}
    for label, src, arch, side in sources:
        for frac in fractions:
            common = [f"data.train_fraction={frac}", f"finetune.input_size={side}", *mini]
            if a.epochs3:
                common.append(f"train.epochs={a.epochs3}")
            tag = f"cifar{frac:g}".replace(".", "p")
            ft = _finetune(a.out, f"{tag}-{label}-{a.policy3.replace(':', '')}", src, data, a.policy3,
                           "finetune-cifar10", common)
            sc = _finetune(a.out, f"{tag}-scratch-{arch}-{side}px", f"scratch:{arch}", data, "full",
                           "finetune-cifar10", common + ["finetune.head_init=fresh", "finetune.compare=false",
                                                         f"optim.lr={a.scratch_lr}"])
            f_row, s_row = _ft_row(ft), _ft_row(sc)
            n_train = ft["data"]["splits"]["train"]
            gain = 100 * (f_row["top1"] - s_row["top1"])
            rows.append([label, f"{frac:.1%} ({n_train})", f"{_ft_row(ft, 'a')['top1']:.4f}", f"{_ft_row(ft, 'b')['top1']:.4f}",
                         f"{f_row['top1']:.4f}", f"{s_row['top1']:.4f}", f"{gain:+.1f}"])
            record[f"{label}@{frac}"] = {"finetune": f_row["top1"], "scratch": s_row["top1"], "gain_points": gain}
    _say(a.out, f"\n## 3. CIFAR-10 with 1% / 10% of the training set, policy {a.policy3}   (load {_load()})\n\n"
         + _table(["pretrained", "train subset", "(a) prototype", "(b) linear probe", f"(c) {a.policy3}",
                   "from scratch", "gain (points)"], rows)
         + "\n\nTest: the official 10,000-image CIFAR-10 test set. The akamaster network was trained on all "
           "50,000 CIFAR-10 training images: its row measures reusing a same-task network, not transfer "
           "across domains.")
    _record(a.out, "cifar10_subsets", record)


# ---------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", choices=["1", "2", "3", "all"])
    p.add_argument("--shared", type=Path, default=Path("/work/shared/data"), help="folder of the shared data")
    p.add_argument("--out", type=Path, default=Path("runs/demos"))
    p.add_argument("--from", dest="ckpt", type=Path, default=None,
                   help="Imagenette run folder for demos 2/3 (default: OUT/imagenette-resnet18, made by demo 1)")
    p.add_argument("--seeds", type=int, default=3, help="demo 2 seeds")
    p.add_argument("--policy3", default="gradual", help="demo 3 policy")
    p.add_argument("--epochs1", type=int, default=None, help="override demo 1's epochs")
    p.add_argument("--epochs3", type=int, default=None, help="override demo 3's epochs")
    p.add_argument("--side", type=int, default=None,
                   help="image side for Imagenette pretraining and for fine-tuning from it (default: the "
                        "recipes' 128 px; 64 px costs a quarter of the compute)")
    p.add_argument("--scratch-lr", type=float, default=0.05, help="optim.lr of the from-scratch controls")
    p.add_argument("--scratch-epochs", type=int, default=30, help="demo 2: epochs of the from-scratch control")
    p.add_argument("--mini", action="store_true", help="tiny subsets and one epoch: checks the commands only")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.mini:
        a.scratch_epochs = 1
    t0 = time.time()
    print(f"load average before: {_load()}", flush=True)
    ckpt = a.ckpt or a.out / "imagenette-resnet18"
    if a.demo in ("1", "all"):
        ckpt = a.ckpt or demo1(a)
    if a.demo in ("2", "3", "all") and not (ckpt / "weights" / "best.safetensors").is_file():
        raise SystemExit(f"{ckpt} has no weights/best.safetensors: run demo 1 first or pass --from RUN")
    if a.demo in ("2", "all"):
        demo2(a, ckpt)
    if a.demo in ("3", "all"):
        demo3(a, ckpt)
    print(f"\nall done in {(time.time() - t0) / 60:.1f} min; load average after: {_load()}; tables: {a.out / 'demos.md'}")


if __name__ == "__main__":
    main()

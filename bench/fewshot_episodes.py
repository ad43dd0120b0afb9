"""Few-shot benchmark (issue 15, "Measure"): 5-way 1-shot and 5-shot episodes on classes the
backbone never saw, prototype head (what `resforge fewshot` builds) against a linear probe on the
same support and query sets; then the prototype rows merged into the model itself.

    # full run (not run on the 2-core VM; the backbone training dominates: ~30 epochs of ResNet-20)
    python bench/fewshot_episodes.py --shared /work/shared/data --out runs/fewshot-bench \\
        --epochs 30 --episodes 600 --merges 5
    # or with a backbone trained already (any MODEL argument: run folder, RUN@vN)
    python bench/fewshot_episodes.py --shared /work/shared/data --out runs/fewshot-bench --backbone runs/r20
    # episodes only, on the published CIFAR-10 ResNet-20 (akamaster, 91.7%; ~1.5 min on 2 cores)
    python bench/fewshot_episodes.py --shared /work/shared/data --out runs/fewshot-bench \
        --backbone /work/shared/data/pretrained/akamaster-resnet20-12fca82f.th --backbone-model resnet20
    # smoke test (< 2 min once CIFAR-10 is in the cache; numbers meaningless)
    python bench/fewshot_episodes.py --smoke --shared /work/shared/data --out /tmp/fewshot-smoke

Backbone: ResNet-20 trained on CIFAR-10 (recipe cifar10-resnet20, --epochs; finished runs are
reused), or --backbone. Novel classes: Imagenette at 32 px, minus English springer and garbage
truck (CIFAR-10 has dog and truck), so 8 classes; up to --per-class train images of each are
extracted from the shared tar (read-only) into OUT/data and read with resforge's folder loader.

Episodes: 5 of the 8 classes, K support + 15 query images per class, the same draws for every
method (seeded). Features are the frozen backbone's pooled features (computed once).
    prototype (centre base)     F.prototypes / F.scores: the rows `resforge fewshot` merges (mu =
                                mean feature of CIFAR-10 train images, the model's own data)
    prototype (centre support)  mu = mean of the episode's support features
    prototype (no centre)       mu = 0
    linear probe                scikit-learn LogisticRegression (lbfgs, C=10, max_iter 1000) on the
                                same centred, L2-normalised support features
Accuracy is mean ± 95% CI (1.96 sd / sqrt(episodes)).

Merged: --merges times, 5 random novel classes with 5 shots each are added to the model with
continual.fewshot.fewshot (a new version of the backbone run each time); reported: old-class
top-1 on the CIFAR-10 test sample before/after and the new classes' top-1 on their held-out
images, all in the 15-way merged head.
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

NOVEL = {"n01440764": "tench", "n02979186": "cassette_player", "n03000684": "chain_saw",
         "n03028079": "church", "n03394916": "French_horn", "n03425413": "gas_pump",
         "n03445777": "golf_ball", "n03888257": "parachute"}       # without n02102040 dog, n03417042 truck
WAYS, QUERIES = 5, 15


def extract_novel(tar: Path, dest: Path, per_class: int) -> Path:
    """The NOVEL classes' first `per_class` train images -> dest/<name>/<file> (once)."""
    folder = dest / f"imagenette-novel-{per_class}"
    if folder.is_dir():
        return folder
    tmp = dest / f".imagenette-novel-{per_class}.tmp"
    counts = dict.fromkeys(NOVEL, 0)
    with tarfile.open(tar) as t:
        for m in t:
            parts = Path(m.name).parts
            if len(parts) == 4 and parts[1] == "train" and parts[2] in NOVEL and m.isfile() \
                    and counts[parts[2]] < per_class:
                counts[parts[2]] += 1
                m.name = f"{NOVEL[parts[2]]}/{parts[3]}"
                t.extract(m, tmp, filter="data")      # no absolute paths, links or devices
    tmp.rename(folder)
    return folder


def backbone_run(a) -> Path:
    if a.backbone:
        return Path(a.backbone)
    import resforge
    name = f"cifar10-resnet20-e{a.epochs}" + ("-smoke" if a.smoke else "")
    run = a.out / name
    if not (run / "report.json").is_file():
        # a validation split, so the run has weights/best.safetensors (what model versions start from)
        extra = ["data.val_fraction=0.1", *(["data.train_fraction=0.05", "eval.tta=false", "optim.lr=0.05"] if a.smoke else [])]
        resforge.train("cifar10-resnet20", [f"data.source={a.shared / 'cifar-10-binary.tar.xz'}",
                                            f"train.epochs={a.epochs}", f"train.project={a.out}",
                                            f"train.name={name}", "train.progress=false", *extra])
    return run


def episodes(feats: torch.Tensor, labels: np.ndarray, mu_base: torch.Tensor, shots: int, n: int,
             seed: int) -> dict[str, list[float]]:
    from sklearn.linear_model import LogisticRegression
    from resforge.continual import fewshot as F
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    acc = {"prototype (centre base)": [], "prototype (centre support)": [], "prototype (no centre)": [],
           "linear probe": []}
    for _ in range(n):
        way = rng.choice(classes, WAYS, replace=False)
        sup, qry = [], []
        for c in way:
            idx = rng.permutation(np.flatnonzero(labels == c))[:shots + QUERIES]
            sup.append(idx[:shots])
            qry.append(idx[shots:])
        ys = np.repeat(np.arange(WAYS), shots)
        yq = np.concatenate([np.full(len(q), i) for i, q in enumerate(qry)])
        fs, fq = feats[np.concatenate(sup)], feats[np.concatenate(qry)]
        for name, mu in (("prototype (centre base)", mu_base), ("prototype (centre support)", fs.mean(0)),
                         ("prototype (no centre)", torch.zeros_like(mu_base))):
            p = F.prototypes(fs, ys, WAYS, mu)
            acc[name].append(float((F.scores(fq, p, mu).argmax(1).numpy() == yq).mean()))
        norm = lambda f: torch.nn.functional.normalize(f - mu_base, dim=1).numpy()  # noqa: E731
        probe = LogisticRegression(C=10.0, max_iter=1000).fit(norm(fs), ys)
        acc["linear probe"].append(float((probe.predict(norm(fq)) == yq).mean()))
    return acc


def merged_trials(run: Path, novel: Path, bundle, n: int, seed: int) -> list[dict]:
    """n times: 5 random novel classes, 5 shots each, merged with fewshot(); held-out top-1."""
    import shutil
    from resforge.checkpoint import load_for_inference
    from resforge.continual import fewshot as F
    rng = np.random.default_rng(seed)
    sp = bundle.splits["train"]
    out = []
    for t in range(n):
        way = sorted(rng.choice(len(bundle.class_names), WAYS, replace=False).tolist())
        sup_dir = novel.parent / f"merge-support-{t}"
        shutil.rmtree(sup_dir, ignore_errors=True)
        held = []
        for c in way:
            idx = rng.permutation(np.flatnonzero(sp.labels == c))
            (sup_dir / bundle.class_names[c]).mkdir(parents=True)
            for i in idx[:5]:
                shutil.copyfile(sp.files[i], sup_dir / bundle.class_names[c] / Path(sp.files[i]).name)
            held += [(i, bundle.class_names[c]) for i in idx[5:5 + 50]]
        r = F.fewshot(f"{run}@v1", sup_dir, shots=5, say=lambda *_: None)   # each trial from the backbone
        model, meta = load_for_inference(r.version.weights)
        x = np.asarray(sp.images[[i for i, _ in held]])
        f, logits = F.embed(model, x, meta["mean"], meta["std"])
        names = np.array(meta["class_names"])
        new_top1 = float((names[logits.argmax(1).numpy()] == np.array([c for _, c in held])).mean())
        out.append({"version": r.version.name, "classes": [bundle.class_names[c] for c in way],
                    "old_top1_before": r.metrics.get("old_top1_before"), "old_top1": r.metrics.get("old_top1"),
                    "new_top1": new_top1, "scale": r.scale})
    return out


def _ci(xs: list[float]) -> str:
    x = np.asarray(xs)
    return f"{100 * x.mean():.2f} ± {100 * 1.96 * x.std(ddof=1) / np.sqrt(len(x)):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("RESFORGE_SHARED_DATA", "/work/shared/data")))
    p.add_argument("--out", type=Path, default=Path("runs/fewshot-bench"))
    p.add_argument("--backbone", default=None, help="MODEL (run folder, RUN@vN) or a CIFAR-10 weights file to use "
                                                    "instead of training one (a weights file: episodes only)")
    p.add_argument("--backbone-model", default=None, help="architecture of a third-party weights file (resnet20)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--per-class", type=int, default=500, help="Imagenette train images per novel class")
    p.add_argument("--merges", type=int, default=5, help="merged-model trials (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="1-epoch backbone on 5%% of CIFAR-10, 20 episodes, 1 merge")
    a = p.parse_args()
    if a.smoke:
        a.epochs, a.episodes, a.per_class, a.merges = 1, 20, 40, 1
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from resforge.checkpoint import load_for_inference
    from resforge.continual import fewshot as F
    from resforge.continual import versions as V
    from resforge.data import load_source
    weights_file = a.backbone and Path(a.backbone).is_file()
    if weights_file:        # third-party weights (e.g. the akamaster CIFAR-10 ResNet-20): episodes only
        model, meta = load_for_inference(a.backbone, model_name=a.backbone_model)
        cifar = load_source(a.shared / "cifar-10-binary.tar.xz").splits["train"]
        idx = np.linspace(0, len(cifar.labels) - 1, num=F.CENTRE_IMAGES).astype(np.int64)
        base_train, a.merges, where = np.asarray(cifar.images[idx]), 0, a.backbone
    else:
        root, version = V.resolve_model(backbone_run(a))
        version = version or V.register_root(root)
        model, meta = load_for_inference(version.weights)
        base_train, where = F.base_samples(version, meta)["train"][0], version.dir
    c, h, w = meta["input_size"]
    novel = extract_novel(a.shared / "imagenette-128.tar", a.out / "data", a.per_class)
    bundle = load_source(novel, image_size=(h, w), channels=c)
    sp = bundle.splits["train"]
    print(f"[{time.time() - t0:.0f} s] {len(sp.labels)} novel images loaded; embedding", flush=True)
    feats, _ = F.embed(model, sp.images, meta["mean"], meta["std"])
    mu, _ = F.embed(model, base_train, meta["mean"], meta["std"])
    mu = mu.mean(0)
    rows, results = [], {}
    for shots in (1, 5):
        print(f"[{time.time() - t0:.0f} s] {a.episodes} {WAYS}-way {shots}-shot episodes", flush=True)
        acc = episodes(feats, sp.labels, mu, shots, a.episodes, a.seed + shots)
        results[f"{shots}-shot"] = {k: {"mean": float(np.mean(v)), "ci95": float(1.96 * np.std(v, ddof=1)
                                                                              / np.sqrt(len(v)))}
                                    for k, v in acc.items()}
        rows += [(f"{WAYS}-way {shots}-shot", k, _ci(v)) for k, v in acc.items()]
    merged = merged_trials(root, novel, bundle, a.merges, a.seed) if a.merges else []
    print(f"\nbackbone {where} ({meta['model']['name']}, {h}x{w}); novel: {len(bundle.class_names)} "
          f"Imagenette classes, {len(sp.labels)} images; {a.episodes} episodes, {QUERIES} queries per class")
    print("| episodes | method | top-1 % (mean ± 95% CI) |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if merged:
        print("\n| merged into the model (15-way) | old top-1 before | old top-1 after | new top-1 (held-out) |"
              "\n|---|---|---|---|")
        for m in merged:
            print(f"| {m['version']}: {', '.join(m['classes'])} | {100 * m['old_top1_before']:.1f} | "
                  f"{100 * m['old_top1']:.1f} | {100 * m['new_top1']:.1f} |")
    (a.out / "fewshot.json").write_text(json.dumps({"episodes": a.episodes, "backbone": str(where),
                                                    "results": results, "merged": merged,
                                                    "seconds": round(time.time() - t0, 1)}, indent=1))
    print(f"\n{time.time() - t0:.0f} s; numbers in {a.out / 'fewshot.json'}")


if __name__ == "__main__":
    main()

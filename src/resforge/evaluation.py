"""`evaluate`: score a run folder or a weights file on splits of a data source, into a report
folder of its own (the API behind `resforge eval`).

The weights are read and proven by checkpoint.load_for_inference; the data is the run's own
(rebuilt by pipeline.prepare_data from the run folder's config.json and splits.json) or the
data named by the caller; pipeline.evaluate_bundle scores it and report.write_report writes
report.md/report.json and the confusion matrices.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from resforge import ood
from resforge.checkpoint import load_for_inference
from resforge.config import AugConfig, RunConfig, load_config
from resforge.data import load_manifest, load_source, make_splits
from resforge.data.augment import Augmenter
from resforge.pipeline import evaluate_bundle, prepare_data, split_counts, tta_record
from resforge.report import write_report
from resforge.runs import new_run_dir, say
from resforge.training.device import make_runtime
from resforge.weightfile import resolve_weights

# Test-time views for weights that carry no augmentation config of their own (torchvision/timm,
# akamaster): ImageNet and CIFAR networks are trained with mirrors and shifted crops, so the
# mirror and (for small images) one-pixel shifts are views they know.
THIRD_PARTY_TTA_AUG = AugConfig(flip="random", translate=1)


def evaluate(source: str | Path, *, data: str | None = None, splits=("test",), tta: bool = False,
             model: str | None = None, batch_size: int = 512, out_dir: str | Path | None = None,
             device: str = "auto", data_root: str | None = None, download: bool = False) -> dict:
    """Evaluate a run folder or a weights file on splits of a data source; returns {split: metrics}
    and writes report.json, report.md and confusion matrices into a new folder: `out_dir` (which
    must not hold a report already), else RUN/eval/<weights>-<splits>[-tta] beside the run's own
    report (never replaced), else runs/eval-<weights>.

    Trust boundary: the weights' sidecar describes the network (architecture, classes,
    preprocessing, augmentation) but never names data, paths, downloads or caches. Without
    `data`, the data is the run's own, read from the run folder around the weights (config.json
    and splits.json beside weights/); `data_root`, `download` and the cache (RESFORGE_CACHE) are
    always the caller's."""
    rt = make_runtime(device, "auto", True)
    weights = resolve_weights(source)
    run_dir = run_folder(weights)
    if out_dir is not None:
        _refuse_existing_report(Path(out_dir))
    if data is None and run_dir is None:
        raise ValueError(f"{weights} is not inside a run folder (with config.json and splits.json beside "
                         "its weights/ folder), so nothing says which data to evaluate it on: pass --data")
    m, meta = load_for_inference(weights, model_name=model, device=rt.device)
    c, h, w = meta["input_size"]
    fixed_size = meta.get("source_format") is None          # resforge checkpoints fix the size
    run_cfg = _run_config(run_dir) if run_dir is not None else None
    if data is None:
        bundle = run_data(run_dir, run_cfg, data_root=data_root, download=download)
    else:
        bundle = load_source(data, image_size=(h, w) if fixed_size else None, channels=c,
                             data_root=data_root, download=download)
        bundle, _ = make_splits(bundle)
    meta = _reconcile_classes(meta, bundle, weights)
    if not fixed_size:
        meta["input_size"] = [c, *bundle.image_size]
    m = m.to(memory_format=torch.channels_last)
    aug, aug_from = _eval_aug(run_cfg, meta, weights)
    augment = Augmenter(aug, meta["mean"], meta["std"], len(meta["class_names"]), tuple(meta["input_size"][1:]))
    t0 = time.perf_counter()
    kept = {}                                    # split -> plain logits: the OOD flag rates
    results = evaluate_bundle(m, bundle, augment, rt, splits, tta, batch_size, keep_logits=kept)
    if not results:
        raise ValueError(f"none of the splits {list(splits)} exist in {bundle.name}: it has {list(bundle.splits)}")
    extra = {"weights": str(weights), "data": {"source": bundle.name, "splits": split_counts(bundle)},
             "eval_seconds": round(time.perf_counter() - t0, 2), "rejected": list(bundle.rejected)}
    if tta:
        extra["tta"] = tta_record(augment, aug_from)
    extra["ood"] = ood.summary(meta.get("ood"), kept)
    out = _eval_out_dir(out_dir, run_dir, weights, bundle.name if data else None, splits, tta)
    write_report(out, results, meta=meta, extra=extra)
    if tta:
        say(f"TTA: {len(extra['tta']['views'])} views ({', '.join(extra['tta']['views'])}), chosen by {aug_from}"
            + ("; it declares no flip or shift, so this is the plain evaluation" if len(extra["tta"]["views"]) == 1
               else ""))
    for s, r in results.items():
        top5 = f"  top5 {r['top5']:.4f}" if len(meta["class_names"]) > 5 else ""  # K <= 5: always 1
        say(f"{s}: top1 {r['top1']:.4f}{top5}  macro-F1 {r['macro']['f1']:.4f}  "
            f"ECE {r['ece']:.4f}  (n={r['n']}{', TTA' if tta else ''})")
    say(ood.describe(extra["ood"]))
    say(f"report: {out / 'report.md'}" + (f" (the run's own report {run_dir / 'report.md'} is unchanged)"
                                          if run_dir is not None and out_dir is None else ""))
    return results


def run_folder(weights: Path) -> Path | None:
    """RUN when the weights are RUN/weights/<tag>.safetensors with RUN/config.json and RUN/splits.json."""
    run = weights.parent.parent
    if weights.parent.name == "weights" and (run / "config.json").is_file() and (run / "splits.json").is_file():
        return run
    return None


def run_data(run_dir: Path, run_cfg: RunConfig | None = None, *, data_root: str | None = None,
             download: bool = False):
    """The run's own data bundle, rebuilt as training did with its saved splits (splits.json);
    where files and caches are found stays local (arguments, environment), whatever the config
    says. Also what `resforge export --int8` calibrates on and checks with."""
    run_cfg = run_cfg if run_cfg is not None else _run_config(run_dir)
    d = replace(run_cfg.data, data_root=data_root, download=download, cache_dir=None, manifest=None)
    bundle, _ = prepare_data(replace(run_cfg, data=d), load_manifest(run_dir / "splits.json"))
    return bundle


def _run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the run folder is damaged; pass --data to "
                         "evaluate its weights on named data") from None
    return load_config(None, base=saved)         # validated as any config


def _eval_aug(run_cfg: RunConfig | None, meta: dict, weights: Path) -> tuple[AugConfig, str]:
    """The augmentation whose views TTA may use: the run's, else the checkpoint's (validated), else
    THIRD_PARTY_TTA_AUG."""
    if run_cfg is not None:
        return run_cfg.aug, "the run's aug config (config.json)"
    saved = meta.get("config", {}).get("aug") if isinstance(meta.get("config"), dict) else None
    if isinstance(saved, dict) and meta.get("source_format") is None:
        return load_config(None, base={"aug": saved}).aug, f"the aug config saved with {weights.name}"
    return THIRD_PARTY_TTA_AUG, ("resforge's default for weights without an aug config (flip + 1-px shifts, "
                                 "as ImageNet/CIFAR networks are trained)")


def _refuse_existing_report(out: Path) -> None:
    if (out / "report.json").exists() or (out / "report.md").exists():
        raise ValueError(f"{out} already holds a report (report.json/report.md), which would be overwritten: "
                         "name a new folder with --out, or leave --out out to get a fresh one")


def _eval_out_dir(out_dir, run_dir: Path | None, weights: Path, data_name: str | None, splits, tta: bool) -> Path:
    """A report folder of its own: out_dir (re-checked: nothing overwritten), else a new folder."""
    if out_dir is not None:
        out = Path(out_dir)
        _refuse_existing_report(out)
        return out
    if run_dir is None:
        return new_run_dir("runs", f"eval-{weights.stem}")
    name = "-".join([weights.stem, *([Path(data_name).stem] if data_name else []), *splits, *(["tta"] if tta else [])])
    return new_run_dir(run_dir / "eval", name)


def _reconcile_classes(meta: dict, bundle, weights: Path) -> dict:
    k = meta["model"]["num_classes"]
    if len(bundle.class_names) != k:
        raise ValueError(f"{weights} predicts {k} classes but {bundle.name} has {len(bundle.class_names)} "
                         f"({', '.join(bundle.class_names[:5])}...): evaluate on data with the same classes, "
                         "or fine-tune first (resforge finetune / train model.pretrained=...)")
    if meta.get("source_format") is not None:                 # third-party: names come from the data
        meta = {**meta, "class_names": list(bundle.class_names)}
    return meta

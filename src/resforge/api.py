"""The documented Python API; each CLI subcommand calls exactly one function here.

    train(recipe=None, overrides=None, resume=None) -> TrainRun
    evaluate(source, data=None, splits=("test",), tta=False, model=None, ...) -> dict
    predict(source, inputs, topk=5, ...) -> list[dict]
    scan(source, ...) -> dict
    degradation(depths=(20, 56), seeds=(0,), ...) -> dict
    finetune(source, data=..., policy=..., ...) -> FinetuneRun    (resforge.finetune)
    lr_find(source=None, data=..., policy=..., ...) -> dict       (resforge.finetune)
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resforge import __version__
from resforge.checkpoint import (atomic_write_text, load_for_inference,
                                 resolve_weights, save_checkpoint, save_state)
from resforge.config import AugConfig, RunConfig, load_config
from resforge.data import load_manifest, load_source, make_splits, save_manifest, subset
from resforge.data.sources import apply_class_names, read_class_names
from resforge.data import scan as _scan
from resforge.data.augment import Augmenter
from resforge.data.loader import make_batches
from resforge.metrics import classification_metrics
from resforge.models import create_model
from resforge.plots import plot_training_curves
from resforge.infer import predict  # noqa: F401  (re-exported API)
from resforge.report import write_report
from resforge.training.health import diagnose, format_warnings
from resforge.runs import MetricsLog, default_run_name, is_main_process, new_run_dir, open_for_resume
from resforge.training.device import Runtime, make_runtime, seed_everything
from resforge.training.budget import plan_epochs
from resforge.training.loop import fit, predict_logits, soft_cross_entropy
from resforge.training.probes import train_eval_batches
from resforge.weights import load_weights

scan = _scan


@dataclass
class TrainRun:
    dir: Path
    config: RunConfig
    model: nn.Module
    meta: dict
    results: dict          # split -> metrics (report.json content per split)
    train_seconds: float


# ---------------------------------------------------------------- data

def prepare_data(cfg: RunConfig, manifest: dict | None = None):
    """Load the source, fix train/val/test (from a manifest when given), subset train."""
    d = cfg.data
    names = read_class_names(d.class_names) if d.class_names else None
    bundle = load_source(d.source, image_size=d.image_size, channels=d.channels, cache_dir=d.cache_dir,
                         download=d.download, data_root=d.data_root, stream=d.stream)
    if names is not None:
        bundle = apply_class_names(bundle, names, d.class_names)
    if manifest is None and d.manifest:
        manifest = load_manifest(d.manifest)
    bundle, manifest = make_splits(bundle, d.val_fraction, d.split_seed, manifest=manifest)
    if d.train_fraction is not None and manifest.get("train_fraction") is None:
        bundle = subset(bundle, "train", d.train_fraction, seed=d.split_seed)
        manifest = make_splits(bundle, manifest=_ids_manifest(bundle, manifest))[1]
        manifest["train_fraction"] = d.train_fraction
    return bundle, manifest


def _ids_manifest(bundle, base: dict) -> dict:
    return {**base, "splits": {s: list(sp.ids) for s, sp in bundle.splits.items()}}


def channel_stats(bundle) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training images in [0, 1] (a 10k-image sample is plenty)."""
    sp = bundle.splits["train"]
    if sp.images is None:                       # streamed: fall back to ImageNet-style stats
        c = bundle.channels
        return [0.5] * c, [0.25] * c
    idx = np.linspace(0, len(sp.labels) - 1, num=min(len(sp.labels), 10_000)).astype(np.int64)
    x = torch.from_numpy(np.asarray(sp.images[idx])).float() / 255    # (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


# ---------------------------------------------------------------- model

def build_model(cfg: RunConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, dict, dict]:
    """The model of the config, its builder kwargs and, if it starts from weights, their
    normalisation ({} when training from scratch: statistics of the data are used)."""
    m = cfg.model
    kwargs = {k: v for k, v in (("shortcut", m.shortcut), ("small_input", m.small_input)) if v is not None}
    if m.drop_rate:
        kwargs["drop_rate"] = m.drop_rate
    model = create_model(m.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not m.pretrained:
        return model, kwargs, {}
    result = load_weights(model, resolve_weights(m.pretrained), head="keep-matching")
    meta = result.meta
    if len(meta.get("mean", [])) == in_chans and len(meta.get("std", [])) == in_chans:
        return model, kwargs, {"mean": meta["mean"], "std": meta["std"]}
    from resforge.checkpoint import IMAGENET_MEAN, IMAGENET_STD   # third-party ImageNet-style weights
    if in_chans == 3:
        return model, kwargs, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return model, kwargs, {"mean": [sum(IMAGENET_MEAN) / 3] * in_chans, "std": [sum(IMAGENET_STD) / 3] * in_chans}


def init_from_data(model: nn.Module, bundle, mean, std, n: int = 5000) -> None:
    """Data-dependent initialisation for models that define `init_from_data(images_u8 (N, C, H, W),
    mean, std)` (e.g. airbench94's whitening conv), fed a strided sample of the training images."""
    hook = getattr(model, "init_from_data", None)
    sp = bundle.splits["train"]
    if hook is None:
        return
    if sp.images is None:
        _say(f"  {type(model).__name__}.init_from_data skipped: streamed training data is not in memory")
        return
    idx = np.linspace(0, len(sp.labels) - 1, num=min(len(sp.labels), n)).astype(np.int64)
    hook(torch.from_numpy(np.asarray(sp.images[idx])), mean, std)


# ---------------------------------------------------------------- train

def _checkpointer(run_dir: Path, base_meta: dict):
    def save(tag: str, model: nn.Module, state, row: dict, resume: dict | None = None) -> None:
        if not is_main_process():
            return
        meta = {**base_meta, "epoch": state.epoch if tag == "last" else state.best_epoch,
                "metrics": {k: v for k, v in row.items() if k != "epoch"}}
        save_checkpoint(run_dir / "weights" / tag, model, meta)
        if resume is not None:
            save_state(run_dir / "weights" / "last.state.pt", resume)
    return save


def train(recipe: str | None = None, overrides: list[str] | dict | None = None, *,
          resume: str | Path | None = None, config: RunConfig | None = None) -> TrainRun:
    """Train a model as the resolved config says; returns the run (folder, model, results).

    resume: a run folder interrupted earlier; its saved config and splits are used and
    training continues from its last completed epoch, with the same result as an
    uninterrupted run in deterministic mode."""
    run_dir, snap, manifest = None, None, None
    if resume is not None:
        run_dir = Path(resume)
        saved, manifest, snap = open_for_resume(run_dir)   # sweeps a killed session's temporaries
        cfg = load_config(None, overrides, base=saved)
    else:
        cfg = config or load_config(recipe, overrides)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rt = make_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last, cfg.train.threads)
    bundle, manifest = prepare_data(cfg, manifest)
    model, model_kwargs, pre = build_model(cfg, len(bundle.class_names), bundle.channels)
    mean, std = (pre["mean"], pre["std"]) if pre.get("mean") else channel_stats(bundle)
    if snap is None and not cfg.model.pretrained:
        init_from_data(model, bundle, mean, std)
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), bundle.image_size, seed=cfg.train.seed)
    tb = make_batches(bundle, "train", rt.device, cfg.train.batch_size, train=True, workers=cfg.data.workers)
    vb = (make_batches(bundle, "val", rt.device, cfg.train.eval_batch_size, train=False, workers=cfg.data.workers)
          if len(bundle.splits["val"].labels) else None)     # data.val_fraction=0: no validation
    teb = train_eval_batches(bundle, cfg.train.eval_train, rt.device, cfg.train.eval_batch_size, cfg.data.workers)
    if cfg.train.fit_budget and snap is None:
        cfg = _fit_budget(cfg, model, tb, [vb, teb], augment, rt)
    if run_dir is None:
        run_dir = new_run_dir(cfg.train.project, cfg.train.name or default_run_name(cfg.model.name, bundle.name))
    meta = {"model": {"name": cfg.model.name, "num_classes": len(bundle.class_names),
                      "in_chans": bundle.channels, "kwargs": model_kwargs},
            "class_names": list(bundle.class_names), "input_size": [bundle.channels, *bundle.image_size],
            "mean": mean, "std": std, "config": cfg.to_dict(), "split_hash": manifest["hash"],
            "data": {"source": bundle.name, "fingerprint": bundle.fingerprint}}
    if is_main_process() and snap is None:
        _write_run_files(run_dir, cfg, manifest, bundle)
    _say(f"resforge {__version__}: {cfg.model.name} on {bundle.name} "
         f"({_split_sizes(bundle)}; {len(bundle.class_names)} classes; "
         f"{bundle.channels}x{bundle.image_size[0]}x{bundle.image_size[1]}) on {rt.describe()} -> {run_dir}")
    if bundle.rejected:
        _say(f"  {len(bundle.rejected)} files rejected (listed in {run_dir / 'report.md'})")
    try:
        result = fit(model, tb, vb, augment, rt, cfg.optim, cfg.train, checkpointer=_checkpointer(run_dir, meta),
                     resume=snap, metrics_log=MetricsLog(run_dir / "metrics.csv"), train_eval_batches=teb)
        results = evaluate_bundle(result.model, bundle, augment, rt, cfg.eval.splits, cfg.eval.tta,
                                  cfg.train.eval_batch_size, cfg.data.workers)
        if is_main_process():
            _finish_run(run_dir, meta, results, bundle, result, cfg, augment)
    except KeyboardInterrupt:
        if is_main_process():      # the last completed epoch is saved: say how to go on from it
            print(f"\ninterrupted; to continue this run: resforge train --resume {shlex.quote(str(run_dir))}",
                  file=sys.stderr, flush=True)
        raise
    return TrainRun(run_dir, cfg, result.model, meta, results, result.train_seconds)


def _fit_budget(cfg: RunConfig, model: nn.Module, tb, eval_batches: list, augment: Augmenter, rt: Runtime):
    """The config with train.epochs replaced by what fits train.max_seconds (training/budget.py)."""
    plan = plan_epochs(cfg.train.max_seconds, model, tb, eval_batches, augment, rt, cfg.optim, cfg.train,
                       soft_cross_entropy(cfg.optim.label_smoothing))
    _say(plan.describe(cfg.train.max_seconds) + f" (the recipe said {cfg.train.epochs})")
    return replace(cfg, train=replace(cfg.train, epochs=plan.epochs))


def _write_run_files(run_dir: Path, cfg: RunConfig, manifest: dict, bundle) -> None:
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    save_manifest(run_dir / "splits.json", manifest)


def _finish_run(run_dir: Path, meta: dict, results: dict, bundle, fit_result, cfg: RunConfig,
                augment: Augmenter) -> None:
    extra = {"rejected": list(bundle.rejected), "train_seconds": round(fit_result.train_seconds, 2),
             "timed_epochs": fit_result.state.timed_epochs,     # < epochs_run: resumed from an untimed state
             "best_epoch": fit_result.state.best_epoch, "epochs_run": fit_result.state.epoch,
             "split_hash": meta["split_hash"], "data": {**meta["data"], "splits": _split_counts(bundle)},
             "ignored_files": bundle.extra.get("ignored", 0)}
    if fit_result.bn_recalibration is not None:
        extra["bn_recalibration"] = fit_result.bn_recalibration
    if cfg.eval.tta:
        extra["tta"] = tta_record(augment, "the run's aug config")
    extra["warnings"] = diagnose(fit_result.state.history, len(bundle.class_names), results,
                                 data=cfg.data.source, lr=cfg.optim.lr)
    if extra["warnings"]:
        _say(format_warnings(extra["warnings"]))
    write_report(run_dir, results, meta=meta, extra=extra)
    plot_training_curves(run_dir / "metrics.csv", run_dir / "results.png",
                         label_smoothing=cfg.optim.label_smoothing)
    summary = "  ".join(f"{s} top1 {r['top1']:.4f}" for s, r in results.items())
    _say(f"done in {fit_result.train_seconds:.1f}s: {summary}\nreport: {run_dir / 'report.md'}\n"
         f"weights: {run_dir / 'weights' / 'best.safetensors'}")


def _split_counts(bundle) -> dict:
    return {s: int(len(sp.labels)) for s, sp in bundle.splits.items()}


def _split_sizes(bundle) -> str:
    return ", ".join(f"{n} {s}" for s, n in _split_counts(bundle).items())


def _say(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


# ---------------------------------------------------------------- experiments

def degradation(depths=(20, 56), seeds=(0,), **kwargs) -> dict:
    """He et al. 2016's degradation experiment (plainD vs resnetD twins, one recipe); see
    resforge.experiments.degradation.run_degradation for the arguments and outputs."""
    from resforge.experiments.degradation import run_degradation   # it imports this module
    return run_degradation(depths, seeds, **kwargs)


def degradation_report(depths=(20, 56), seeds=(0,), **kwargs) -> dict:
    """Redraw the degradation experiment's figures and table from its runs as they stand, training
    nothing (unfinished runs drawn up to their last epoch); see report_degradation."""
    from resforge.experiments.degradation import report_degradation
    return report_degradation(depths, seeds, **kwargs)


# ---------------------------------------------------------------- evaluate

def evaluate_bundle(model: nn.Module, bundle, augment: Augmenter, rt: Runtime, splits, tta: bool,
                    batch_size: int, workers: int = 2) -> dict:
    out = {}
    for s in splits:
        if s not in bundle.splits or len(bundle.splits[s].labels) == 0:
            continue
        batches = make_batches(bundle, s, rt.device, batch_size, train=False, workers=workers)
        views = f" (TTA x{len(augment.tta_view_names())})" if tta else ""
        logits, labels = predict_logits(model, batches, augment, rt, tta=tta, desc=f"evaluating {s}{views}")
        out[s] = classification_metrics(logits.numpy(), labels.numpy(), list(bundle.class_names))
        out[s]["tta"] = tta
        if tta:
            out[s]["tta_views"] = augment.tta_view_names()
    return out


# Test-time views for weights that carry no augmentation config of their own (torchvision/timm,
# akamaster): ImageNet and CIFAR networks are trained with mirrors and shifted crops, so the
# mirror and (for small images) one-pixel shifts are views they know.
THIRD_PARTY_TTA_AUG = AugConfig(flip="random", translate=1)


def tta_record(augment: Augmenter, source: str) -> dict:
    """report.json's "tta": the views averaged and where their choice came from."""
    a = augment.cfg
    return {"views": augment.tta_view_names(), "from": source,
            "aug": {"flip": a.flip, "translate": a.translate}}


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
    run_dir = _run_folder(weights)
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
        # The run's own data, rebuilt as training did with its saved splits; where files and
        # caches are found stays local (arguments, environment), whatever the config says.
        d = replace(run_cfg.data, data_root=data_root, download=download, cache_dir=None, manifest=None)
        bundle, _ = prepare_data(replace(run_cfg, data=d), load_manifest(run_dir / "splits.json"))
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
    results = evaluate_bundle(m, bundle, augment, rt, splits, tta, batch_size)
    if not results:
        raise ValueError(f"none of the splits {list(splits)} exist in {bundle.name}: it has {list(bundle.splits)}")
    extra = {"weights": str(weights), "data": {"source": bundle.name, "splits": _split_counts(bundle)},
             "eval_seconds": round(time.perf_counter() - t0, 2), "rejected": list(bundle.rejected)}
    if tta:
        extra["tta"] = tta_record(augment, aug_from)
    out = _eval_out_dir(out_dir, run_dir, weights, bundle.name if data else None, splits, tta)
    write_report(out, results, meta=meta, extra=extra)
    if tta:
        _say(f"TTA: {len(extra['tta']['views'])} views ({', '.join(extra['tta']['views'])}), chosen by {aug_from}"
             + ("; it declares no flip or shift, so this is the plain evaluation" if len(extra["tta"]["views"]) == 1
                else ""))
    for s, r in results.items():
        top5 = f"  top5 {r['top5']:.4f}" if len(meta["class_names"]) > 5 else ""  # K <= 5: always 1
        _say(f"{s}: top1 {r['top1']:.4f}{top5}  macro-F1 {r['macro']['f1']:.4f}  "
             f"ECE {r['ece']:.4f}  (n={r['n']}{', TTA' if tta else ''})")
    _say(f"report: {out / 'report.md'}" + (f" (the run's own report {run_dir / 'report.md'} is unchanged)"
                                           if run_dir is not None and out_dir is None else ""))
    return results


def _run_folder(weights: Path) -> Path | None:
    """RUN when the weights are RUN/weights/<tag>.safetensors with RUN/config.json and RUN/splits.json."""
    run = weights.parent.parent
    if weights.parent.name == "weights" and (run / "config.json").is_file() and (run / "splits.json").is_file():
        return run
    return None


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


# ---------------------------------------------------------------- fine-tuning

def finetune(source, **kwargs):
    """Fine-tune pretrained weights on new data with a policy; see resforge.finetune.run.finetune."""
    from resforge.finetune.run import finetune as _finetune   # it imports this module
    return _finetune(source, **kwargs)


def lr_find(source=None, **kwargs) -> dict:
    """Learning-rate range test (plot + suggested rate); see resforge.finetune.lrfind.lr_find."""
    from resforge.finetune.lrfind import lr_find as _lr_find
    return _lr_find(source, **kwargs)


# ---------------------------------------------------------------- continual

def fewshot(model, support, **kwargs):
    """New classes from K images each, as prototype rows of a new model version; see
    resforge.continual.fewshot.fewshot."""
    from resforge.continual.fewshot import fewshot as _fewshot   # it imports this module
    return _fewshot(model, support, **kwargs)

"""`train`: one training run from a config, into a run folder (the API behind `resforge train`).

    run = train("digits", ["train.epochs=5"])       # -> TrainRun (dir, config, model, meta, results)
    train(resume="runs/digits-resnet20")             # continue an interrupted run

The config becomes data, model and batches through pipeline.py; training/loop.fit trains;
this module adds the run folder around it: checkpoints per epoch, the resume state, metrics.csv,
the final evaluation, report.md/report.json and the training-curve figure.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from resforge import __version__
from resforge import distributed as D
from resforge import ood
from resforge.checkpoint import add_to_sidecars, save_checkpoint, save_state
from resforge.config import RunConfig, load_config
from resforge.data.augment import Augmenter
from resforge.flops import compute_record, describe as describe_compute, run_flops
from resforge.pipeline import (build_model, evaluate_bundle, init_from_data, normalisation, place_model,
                               prepare_data, split_counts, start_runtime, train_batches, tta_record,
                               val_batches, write_run_files)
from resforge.plots import plot_training_curves
from resforge.report import write_report
from resforge.runs import MetricsLog, default_run_name, is_main_process, new_run_dir, open_for_resume, say
from resforge.training.budget import plan_epochs
from resforge.training.device import Runtime
from resforge.training.health import diagnose, format_warnings
from resforge.training.loop import fit, soft_cross_entropy
from resforge.training.optim import batch_scale, optimizer_flops_per_step
from resforge.weightfile import resolve_weights
from resforge.training.probes import train_eval_batches


@dataclass
class TrainRun:
    dir: Path
    config: RunConfig
    model: nn.Module
    meta: dict
    results: dict          # split -> metrics (report.json content per split)
    train_seconds: float


def train(recipe: str | None = None, overrides: list[str] | dict | None = None, *,
          resume: str | Path | None = None, config: RunConfig | None = None) -> TrainRun:
    """Train a model as the resolved config says; returns the run (folder, model, results).

    resume: a run folder interrupted earlier; its saved config and splits are used and
    training continues from its last completed epoch, with the same result as an
    uninterrupted run in deterministic mode.

    Under torchrun (several processes) every rank calls this; rank 0 writes the run folder. After
    a torchrun restart (--max-restarts) the job's first run folder is resumed (distributed.recall)."""
    run_dir, snap, manifest, rt = None, None, None, None
    if resume is None:
        cfg = config or load_config(recipe, overrides)
        rt = start_runtime(cfg, distributed=True)          # joins torchrun's process group, if any
        resume = D.recall(cfg.train.project)
        overrides = None if resume is not None else overrides    # a restart: the saved config as it is
    if resume is not None:
        run_dir = Path(resume)
        saved, manifest, snap = open_for_resume(run_dir)   # sweeps a killed session's temporaries
        cfg = load_config(None, overrides, base=saved)
        rt = start_runtime(cfg, distributed=True)
    bundle, manifest = prepare_data(cfg, manifest)
    model, model_kwargs, pre = build_model(cfg, len(bundle.class_names), bundle.channels)
    mean, std = normalisation(pre, bundle)
    if snap is None and not cfg.model.pretrained:
        init_from_data(model, bundle, mean, std)
    model = place_model(model, rt)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), bundle.image_size, seed=cfg.train.seed,
                        epochs=cfg.train.epochs)
    augment.check_model(model, bundle.channels, rt.device)      # progressive resizing: can it take the sizes?
    tb, vb = train_batches(cfg, bundle, rt), val_batches(cfg, bundle, rt)
    teb = train_eval_batches(bundle, cfg.train.eval_train, rt.device, cfg.train.eval_batch_size, cfg.data.workers)
    if cfg.train.fit_budget and snap is None:
        cfg = _fit_budget(cfg, model, tb, [vb, teb], augment, rt)
    if run_dir is None:                # rank 0 creates it, the others are told which
        run_dir = D.broadcast_object(new_run_dir(cfg.train.project, cfg.train.name or default_run_name(
            cfg.model.name, bundle.name)) if is_main_process() else None)
        D.remember(cfg.train.project, run_dir)
    meta = {"model": {"name": cfg.model.name, "num_classes": len(bundle.class_names),
                      "in_chans": bundle.channels, "kwargs": model_kwargs},
            "class_names": list(bundle.class_names), "input_size": [bundle.channels, *bundle.image_size],
            "mean": mean, "std": std, "config": cfg.to_dict(), "split_hash": manifest["hash"],
            "data": {"source": bundle.name, "fingerprint": bundle.fingerprint}}
    if D.active():
        meta["distributed"] = distributed_record(cfg)
    if is_main_process() and snap is None:
        write_run_files(run_dir, cfg, manifest, bundle)
    say(f"resforge {__version__}: {cfg.model.name} on {bundle.name} "
        f"({_split_sizes(bundle)}; {len(bundle.class_names)} classes; "
        f"{bundle.channels}x{bundle.image_size[0]}x{bundle.image_size[1]}) on {rt.describe()}"
        f"{', ' + D.describe() if D.active() else ''} -> {run_dir}")
    if bundle.rejected:
        say(f"  {len(bundle.rejected)} files rejected (listed in {run_dir / 'report.md'})")
    try:
        result = fit(model, tb, vb, augment, rt, cfg.optim, cfg.train, checkpointer=_checkpointer(run_dir, meta),
                     resume=snap, metrics_log=MetricsLog(run_dir / "metrics.csv"), train_eval_batches=teb)
        kept = {}                    # split -> plain logits, for the OOD threshold (ood.py)
        results = evaluate_bundle(result.model, bundle, augment, rt, cfg.eval.splits, cfg.eval.tta,
                                  cfg.train.eval_batch_size, cfg.data.workers, keep_logits=kept)
        if is_main_process():
            flops = training_flops_record(model, bundle, cfg, augment, result.state, len(tb) * cfg.train.batch_size)
            _finish_run(run_dir, meta, results, bundle, result, cfg, augment, kept, flops)
        D.barrier()                    # no rank exits (and ends the job) before rank 0 has written
        D.forget(cfg.train.project)
    except KeyboardInterrupt:
        if is_main_process():      # the last completed epoch is saved: say how to go on from it
            print(f"\ninterrupted; to continue this run: resforge train --resume {shlex.quote(str(run_dir))}",
                  file=sys.stderr, flush=True)
        raise
    return TrainRun(run_dir, cfg, result.model, meta, results, result.train_seconds)


def distributed_record(cfg: RunConfig) -> dict:
    """What a distributed run was: processes, backend, how the global batch was cut, the rate used."""
    share = cfg.train.batch_size // D.world_size()
    return {"world_size": D.world_size(), "backend": D.backend(), "global_batch": cfg.train.batch_size,
            "per_process_batch": share, "accumulate": cfg.train.accumulate,
            "micro_batch": share // cfg.train.accumulate, "sync_bn": cfg.train.sync_bn,
            "lr": cfg.optim.lr * batch_scale(cfg.optim, cfg.train.batch_size), "lr_scaling": cfg.optim.lr_scaling}


def _checkpointer(run_dir: Path, base_meta: dict):
    """fit's checkpointer: weights/<tag>.safetensors + sidecar (and the resume state with "last")."""
    def save(tag: str, model: nn.Module, state, row: dict, resume: dict | None = None) -> None:
        if not is_main_process():
            return
        meta = {**base_meta, "epoch": state.epoch if tag == "last" else state.best_epoch,
                "metrics": {k: v for k, v in row.items() if k != "epoch"}}
        save_checkpoint(run_dir / "weights" / tag, model, meta)
        if resume is not None:
            save_state(run_dir / "weights" / "last.state.pt", resume)
    return save


def _fit_budget(cfg: RunConfig, model: nn.Module, tb, eval_batches: list, augment: Augmenter, rt: Runtime):
    """The config with train.epochs replaced by what fits train.max_seconds (training/budget.py)."""
    plan = plan_epochs(cfg.train.max_seconds, model, tb, eval_batches, augment, rt, cfg.optim, cfg.train,
                       soft_cross_entropy(cfg.optim.label_smoothing))
    say(plan.describe(cfg.train.max_seconds) + f" (the recipe said {cfg.train.epochs})")
    return replace(cfg, train=replace(cfg.train, epochs=plan.epochs))


def _finish_run(run_dir: Path, meta: dict, results: dict, bundle, fit_result, cfg: RunConfig,
                augment: Augmenter, kept: dict, flops: dict) -> None:
    """The OOD threshold into the sidecars; report.md/report.json (results, health warnings, TTA and
    OOD records) and results.png of a finished run."""
    # The threshold is fitted on the final model's val logits, which exist only now; 'best' was
    # saved during training, so its sidecar (and 'last''s, if it holds the same tensors) is rewritten.
    record = ood.fit_on_val(kept, cfg.eval.ood_score, cfg.eval.ood_accept_rate)
    if ood.fitted(record):
        meta["ood"] = record
        add_to_sidecars(run_dir / "weights", fit_result.model, {"ood": record})
    extra = {"rejected": list(bundle.rejected), "train_seconds": round(fit_result.train_seconds, 2),
             "timed_epochs": fit_result.state.timed_epochs,     # < epochs_run: resumed from an untimed state
             "best_epoch": fit_result.state.best_epoch, "epochs_run": fit_result.state.epoch,
             "split_hash": meta["split_hash"], "data": {**meta["data"], "splits": split_counts(bundle)},
             "ignored_files": bundle.extra.get("ignored", 0)}
    if fit_result.bn_recalibration is not None:
        extra["bn_recalibration"] = fit_result.bn_recalibration
    st = fit_result.state
    extra["compute"] = compute_record(fit_result.model, meta["input_size"], images_seen=st.images_seen,
                                      eval_images=st.eval_images, pass_seconds=st.pass_seconds,
                                      wall_seconds=st.seconds)
    if isinstance(flops.get("train"), float):  # progressive resizing / Muon: each epoch at its size, + optimiser
        c = extra["compute"]
        c["train_flops"], c["detail"] = flops["train"], "training_flops (per size, optimiser products)"
        c["achieved_flops_per_s"] = flops["train"] / st.pass_seconds if st.pass_seconds > 0 else None
    say(describe_compute(extra["compute"]))
    if cfg.eval.tta:
        extra["tta"] = tta_record(augment, "the run's aug config")
    extra["training_flops"] = flops
    extra["ood"] = ood.summary(record, kept)
    if "distributed" in meta:
        extra["distributed"] = meta["distributed"]
    say(ood.describe(extra["ood"]))
    extra["warnings"] = diagnose(fit_result.state.history, len(bundle.class_names), results,
                                 data=cfg.data.source, lr=cfg.optim.lr)
    if extra["warnings"]:
        say(format_warnings(extra["warnings"]))
    write_report(run_dir, results, meta=meta, extra=extra)
    plot_training_curves(run_dir / "metrics.csv", run_dir / "results.png",
                         label_smoothing=cfg.optim.label_smoothing)
    summary = "  ".join(f"{s} top1 {r['top1']:.4f}" for s, r in results.items())
    say(f"done in {fit_result.train_seconds:.1f}s: {summary}\nreport: {run_dir / 'report.md'}\n"
        f"weights: {resolve_weights(run_dir)}")


def training_flops_record(model: nn.Module, bundle, cfg: RunConfig, augment: Augmenter, state,
                          epoch_images: int) -> dict:
    """report.json's training_flops: flops.run_flops over the epochs run, each at the size it trained at
    (progressive resizing), with epoch_images = steps per epoch x batch (at most the split's images).
    model: the trained one, not an EMA copy (whose frozen parameters no optimiser steps)."""
    sizes = [augment.train_hw(e) for e in range(state.epoch)]
    images = min(epoch_images, len(bundle.splits["train"].labels)) if "train" in bundle.splits else epoch_images
    try:
        record = run_flops(model, bundle.channels, sizes, images, state.step, optimizer_flops_per_step(model, cfg.optim))
    except (RuntimeError, ValueError, TypeError) as e:          # a count must not cost a finished run its report
        return {"error": f"not counted: {str(e).splitlines()[0]}"}
    record["images_per_epoch"] = images
    if augment.sizes is not None:
        record["progressive_resize"] = {"start": cfg.aug.resize_start, "ramp": cfg.aug.resize_ramp,
                                        "sizes": [f"{h}x{w}" for h, w in sizes]}
    return record


def _split_sizes(bundle) -> str:
    return ", ".join(f"{n} {s}" for s, n in split_counts(bundle).items())

"""A recipe's (or a finished run's) work in FLOPs and images, and its compute floors.

The work of the timed training (what `train_seconds` covers: fit's epochs with their
in-training evaluations) is

    train FLOPs = training images x FLOPs per training image (forward + backward)
                + in-training evaluation images x FLOPs per evaluated image (forward)

and, after training (not in train_seconds; reported apart): the final evaluation of
eval.splits, times the TTA views when eval.tta. A finished run's numbers come from
report.json["compute"] when the run wrote one, else they are derived from its config.json,
report.json (epochs run, split sizes) and metrics.csv (which epochs validated).

Floors, in seconds:
    ideal = train FLOPs / the machine's peak FLOP/s          (nothing but arithmetic at peak)
    conv  = train FLOPs / the model's own convs' FLOP/s      (its layer shapes, timed alone)
    bare  = training images x bare seconds per image + evaluation images x bare eval seconds
            per image                                        (the model's whole step, no pipeline)
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from resforge.config import RunConfig


@dataclass
class Work:
    flops_per_train_image: float     # forward + backward, FLOPs (2 per multiply-add)
    flops_per_eval_image: float      # one evaluated image (forward; TTA views included if the record says so)
    train_images: int                # images trained on (forward + backward), all epochs
    eval_images: int                 # images evaluated during training (validation, train-eval)
    steps: int                       # optimiser steps
    final_eval_images: int           # after training: eval.splits images x TTA views (one forward each)
    train_flops: float               # of the timed training: train_images and eval_images
    source: str                      # where the numbers came from
    train_seconds: float | None = None   # a finished run's measured training wall time

    def as_dict(self) -> dict:
        return asdict(self)


def images_per_epoch(n_train: int, batch_size: int) -> int:
    """Training images of one epoch: the last partial batch is dropped (loader.py), unless the
    split is no bigger than one batch (then it is the only batch)."""
    return n_train // batch_size * batch_size if n_train > batch_size else n_train


def validations(epochs: int, val_every: int) -> int:
    """Epochs of 1..epochs that validate: every val_every-th and the last (loop.fit)."""
    return sum(1 for e in range(1, epochs + 1) if e % val_every == 0 or e == epochs)


def recipe_work(cfg: RunConfig, flops: dict, splits: dict[str, int], tta_views: int) -> Work:
    """The work a recipe will do. flops: resforge.flops.count_flops of its model at its input
    size; splits: {split: images} of its data; tta_views: views per image when eval.tta."""
    t = cfg.train
    n_train, n_val = splits.get("train", 0), splits.get("val", 0)
    per_epoch = images_per_epoch(n_train, t.batch_size)
    evals = (validations(t.epochs, t.val_every) * n_val if n_val else 0) + min(t.eval_train, n_train) * t.epochs
    views = tta_views if cfg.eval.tta else 1
    final = sum(splits.get(s, 0) for s in cfg.eval.splits) * views
    train_images = per_epoch * t.epochs
    return Work(flops["train"], flops["inference"], train_images, evals, -(-per_epoch // t.batch_size) * t.epochs,
                final, flops["train"] * train_images + flops["inference"] * evals, f"recipe {cfg.recipe or '?'}")


def read_report(run_dir: Path) -> dict:
    """report.json of a finished run, or one sentence saying why there is none."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished run (its training did not reach "
                                f"the final evaluation); finish it with `resforge train --resume {run_dir}`, or bench "
                                "its recipe instead")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); re-run the final evaluation with "
                         f"`resforge eval {run_dir}` or bench its recipe instead") from None


def _metrics_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_work(run_dir: Path, cfg: RunConfig, report: dict, flops: dict, tta_views: int) -> Work:
    """The work a finished run did: report.json["compute"] when present; else derived from the
    run's config, report and metrics.csv, with `flops` (count_flops of its model) per image."""
    splits = report.get("data", {}).get("splits", {})
    views = len(report["tta"]["views"]) if isinstance(report.get("tta"), dict) else tta_views
    final = sum(int(splits.get(s, 0)) for s in cfg.eval.splits) * (views if cfg.eval.tta else 1)
    c = report.get("compute")
    if isinstance(c, dict) and {"flops_per_train_image", "train_images_seen", "train_flops"} <= set(c):
        images = int(c["train_images_seen"])
        return Work(float(c["flops_per_train_image"]), float(c.get("flops_per_eval_image", flops["inference"])),
                    images, int(c.get("eval_images", 0)), -(-images // cfg.train.batch_size), final,
                    # the record keeps training and in-training evaluation apart; the floors cover both,
                    # so they are set against the wall seconds that include the evaluation
                    float(c["train_flops"]) + float(c.get("eval_flops") or 0.0), "report.json compute",
                    _seconds(c.get("wall_seconds", c.get("train_seconds")), report))
    rows = _metrics_rows(run_dir)
    epochs = int(report.get("epochs_run", len(rows) or cfg.train.epochs))
    n_train, n_val = int(splits.get("train", 0)), int(splits.get("val", 0))
    if rows and rows[-1].get("images_seen"):
        images = int(float(rows[-1]["images_seen"]))
    else:
        images = images_per_epoch(n_train, cfg.train.batch_size) * epochs
    if rows:                                   # exactly the epochs that validated / measured train-eval
        evals = sum(n_val for r in rows if r.get("val_loss")) + \
            sum(min(cfg.train.eval_train, n_train) for r in rows if r.get("train_eval_loss"))
    else:
        evals = validations(epochs, cfg.train.val_every) * n_val + min(cfg.train.eval_train, n_train) * epochs
    cumulative = rows[-1].get("train_seconds") if rows else None          # metrics.csv's wall clock
    return Work(flops["train"], flops["inference"], images, evals, -(-images // cfg.train.batch_size), final,
                flops["train"] * images + flops["inference"] * evals,
                "derived from config.json, report.json and metrics.csv",
                _seconds(None, report) or (float(cumulative) if cumulative else None))


def _seconds(value, report: dict) -> float | None:
    """The first positive of value and report.json's train_seconds (fit's wall clock, evaluation
    during training included), else None."""
    for v in (value, report.get("train_seconds")):
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return None


def floors(work: Work, peak_flops_per_s: float, conv_flops_per_s: float, bare_s_per_image: float,
           bare_eval_s_per_image: float, inference_flops: float) -> dict:
    """{"ideal", "conv", "bare"} floors in seconds of the timed training, and "final_eval_bare":
    the bare seconds of the evaluation after training. bare_eval_s_per_image is one forward;
    an evaluated image that costs more FLOPs (TTA views in the record) costs proportionally more."""
    per_eval = bare_eval_s_per_image * (work.flops_per_eval_image / inference_flops if inference_flops else 1.0)
    return {"ideal": work.train_flops / peak_flops_per_s,
            "conv": work.train_flops / conv_flops_per_s if conv_flops_per_s else None,
            "bare": work.train_images * bare_s_per_image + work.eval_images * per_eval,
            "final_eval_bare": work.final_eval_images * bare_eval_s_per_image}

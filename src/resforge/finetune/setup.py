"""What `finetune` and `lr_find` share: the resolved config, data, the pretrained network with its
new head, batches, loss, and the cached-feature probes a policy starts from."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from resforge.config import ConfigError, RunConfig, load_config
from resforge.data.augment import Augmenter
from resforge.data.loader import TensorBatches, make_batches
from resforge.finetune import policies as P
from resforge.finetune.probe import extract_features, linear_probe, reestimate_bn
from resforge.finetune.source import (Pretrained, build_from_pretrained, class_row_map, input_stats,
                                      keep_class_rows, read_pretrained)
from resforge.pipeline import channel_stats, place_model, prepare_data, start_runtime, train_batches, val_batches
from resforge.runs import MetricsLog, say
from resforge.training.loop import soft_cross_entropy


@dataclass
class Setup:
    """Everything finetune and lr_find share: config, data, model, batches, loss."""
    cfg: RunConfig
    rt: object
    bundle: object
    manifest: dict
    pre: Pretrained
    model: nn.Module
    kwargs: dict
    augment: Augmenter
    mean: list
    std: list
    phases: list
    loss_fn: object
    sample_weights: np.ndarray | None
    train_batches: object
    val_batches: object | None
    notes: list
    bn: str = "train"                # finetune.bn resolved ("auto" -> "train", or "freeze-stats" for LoRA)


def resolve_config(recipe=None, overrides=None, *, data=None, policy=None, source=None,
                   config: RunConfig | None = None) -> RunConfig:
    cfg = config or load_config(recipe, overrides)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), finetune=dataclasses.replace(cfg.finetune),
                              model=dataclasses.replace(cfg.model))
    if data is not None:
        cfg.data.source = str(data)
    if policy is not None:
        cfg.finetune.policy = policy
    if source is not None:
        cfg.model.pretrained = str(source)
    if cfg.train.fit_budget:
        raise ConfigError("train.fit_budget sizes one training schedule to train.max_seconds; a fine-tuning "
                          "policy runs several phases: set train.epochs (train.max_seconds alone still stops a "
                          "phase at the budget)")
    return cfg


def build_setup(cfg: RunConfig, source, model_name: str | None) -> Setup:
    # Distributed: the policy's fits run DDP over sharded batches; the feature passes before them
    # (rows a/b, the probe, AdaBN) run whole in every process (same result everywhere, only rank 0 writes).
    rt = start_runtime(cfg, distributed=True)
    pre = read_pretrained(source, model_name, cfg.finetune.source_classes)
    bundle, manifest = prepare_data(cfg)
    model, kwargs, notes = _model(cfg, pre, bundle)
    phases = P.plan(cfg.finetune.policy, model, cfg.finetune, cfg.train.epochs)   # bad policy: fail now
    model = place_model(model, rt)
    mean, std = input_stats(pre, bundle.channels)
    side = cfg.finetune.input_size
    out_hw = (side, side) if side else tuple(bundle.image_size)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), out_hw, seed=cfg.train.seed)
    sample_weights, class_w = _imbalance(bundle, cfg)
    tb = _train_batches(bundle, cfg, rt, sample_weights)
    vb = val_batches(cfg, bundle, rt)
    return Setup(cfg, rt, bundle, manifest, pre, model, kwargs, augment, mean, std, phases,
                  soft_cross_entropy(cfg.optim.label_smoothing, class_w), sample_weights, tb, vb, notes,
                 P.resolve_bn(cfg.finetune.bn, phases))


def _model(cfg: RunConfig, pre: Pretrained, bundle) -> tuple[nn.Module, dict, list[str]]:
    """The pretrained network with a head for the data's classes (rows kept where asked)."""
    if pre.fmt == "scratch":                             # the control: the data's own statistics
        pre.kwargs = {k: v for k, v in (("shortcut", cfg.model.shortcut), ("small_input", cfg.model.small_input))
                      if v is not None}
        pre.in_chans = bundle.channels
        pre.mean, pre.std = channel_stats(bundle)
    names = list(bundle.class_names)
    model, kwargs = build_from_pretrained(pre, len(names), bundle.channels, cfg.model.drop_rate)
    notes = _adaptation_notes(pre, bundle, cfg)
    if cfg.finetune.keep_class_rows or cfg.finetune.class_map:
        rows = class_row_map(names, pre.class_names, cfg.finetune.class_map)
        keep_class_rows(model, pre, rows)
        pairs = ", ".join(f"{names[i]}<-{pre.class_names[j] if pre.class_names else j}" for i, j in list(rows.items())[:8])
        notes.append(f"head rows kept from the pretrained classes for {len(rows)} of {len(names)} classes: {pairs}")
    return model, kwargs, notes


def _adaptation_notes(pre: Pretrained, bundle, cfg: RunConfig) -> list[str]:
    if pre.fmt == "scratch":
        return [f"{pre.arch} randomly initialised: the from-scratch control, same pipeline as fine-tuning"]
    notes = []
    if bundle.channels != pre.in_chans:
        notes.append(f"stem adapted from {pre.in_chans} to {bundle.channels} input channels "
                     "(filters summed for grey input; or convert the data with data.channels=3)")
    side = cfg.finetune.input_size or bundle.image_size[0]
    trained = pre.input_size[-1]
    if side * 2 <= trained:
        notes.append(f"the weights were trained at {trained} px but see {side} px here: "
                     f"finetune.input_size={trained} upsamples each batch on the fly (slower, usually better)")
    elif side != bundle.image_size[0]:
        notes.append(f"images stored at {bundle.image_size[0]} px are resized to {side} px per batch")
    if cfg.eval.tta:
        notes.append("row (c) uses test-time augmentation (eval.tta); rows (a) and (b) score single views")
    return notes


def _imbalance(bundle, cfg: RunConfig) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """Per-image draw weights (balanced sampling) and per-class loss weights (class_weights),
    both from inverse class frequency of the training split: w_c = N / (K * n_c)."""
    labels = bundle.splits["train"].labels
    k = len(bundle.class_names)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    inv = np.where(counts > 0, len(labels) / (k * np.maximum(counts, 1)), 0.0)
    sample = inv[labels] if cfg.finetune.balanced_sampling else None
    class_w = torch.tensor(inv, dtype=torch.float32) if cfg.finetune.class_weights == "balanced" else None
    return sample, class_w


def _train_batches(bundle, cfg: RunConfig, rt, sample_weights):
    sp = bundle.splits["train"]
    if sample_weights is None:
        return train_batches(cfg, bundle, rt)
    if sp.images is None:
        raise ValueError("finetune.balanced_sampling needs the training images in memory, but data.stream=true: "
                         "set data.stream=false, or use finetune.class_weights=balanced instead")
    return TensorBatches(sp.images, sp.labels, rt.device, cfg.train.batch_size, shuffle=True, drop_last=True,
                         sample_weights=sample_weights)


class PhaseLog:
    """metrics.csv rows of one phase: a `phase` column, and epochs and the cumulative clock
    columns (wall_seconds, train_seconds, images_seen) counted across phases."""

    CUMULATIVE = ("wall_seconds", "train_seconds", "images_seen")

    def __init__(self, log: MetricsLog, phase: str, offset: int):
        self.log, self.phase, self.offset = log, phase, offset
        last = (log.rows() or [{}])[-1]               # the phases before this one
        self.base = {k: float(last[k]) for k in self.CUMULATIVE if last.get(k) not in (None, "")}

    def append(self, row: dict) -> None:
        moved = {k: row[k] + (int if k == "images_seen" else float)(self.base.get(k, 0))
                 for k in self.CUMULATIVE if k in row}
        self.log.append({**row, **moved, "epoch": row["epoch"] + self.offset, "phase": self.phase})

    def truncate(self, last_epoch: int) -> None:      # phases never resume
        pass


def cached_features(s: Setup, splits=("train", "val", "test")) -> dict:
    """Frozen-backbone features of every split, computed once (BN in eval mode, no augmentation)."""
    out, seconds = {}, {}
    for split in splits:
        if len(s.bundle.splits[split].labels):
            t0 = time.perf_counter()
            b = make_batches(s.bundle, split, s.rt.device, s.cfg.train.eval_batch_size, train=False,
                             workers=s.cfg.data.workers)
            out[split] = extract_features(s.model, b, s.augment, s.rt, desc=f"extracting features ({split})")
            seconds[split] = time.perf_counter() - t0
    say(f"features cached: {', '.join(f'{k} {tuple(v[0].shape)}' for k, v in out.items())} "
         f"in {sum(seconds.values()):.1f}s")
    out["seconds"] = seconds["train"]          # what training a head costs: the train split's pass
    out["seconds_by_split"] = seconds
    return out


def _probe(s: Setup, feats: dict, log: MetricsLog | None, offset: int):
    return linear_probe(s.model.fc, feats["train"], feats.get("val"), s.rt, s.cfg, loss_fn=s.loss_fn,
                        sample_weights=s.sample_weights,
                        metrics_log=None if log is None else PhaseLog(log, "probe", offset))


def fit_probe(s: Setup, feats: dict, log: MetricsLog | None, announce: bool = True, extra_seconds: float = 0.0):
    """-> (head, fit result, seconds incl. the train split's feature pass, trainable, total)."""
    head, res = _probe(s, feats, log, 0)
    trainable, total = sum(p.numel() for p in head.parameters()), P.count_params(s.model)
    if announce:
        say(f"phase 'probe' (linear head on cached features, backbone frozen, BN in eval mode): trainable params "
             f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%) in {s.pre.arch}; {res.train_seconds:.1f}s")
    return head, res, res.train_seconds + feats["seconds"] + extra_seconds, trainable, total


def adapt_bn(s: Setup, bns: list[nn.Module]) -> float:
    """When the policy trains BN layers, re-estimate their statistics on the training images
    (AdaBN, no weight changes) so the head is fitted on the features fine-tuning starts from.
    -> seconds spent (0 when there is nothing to adapt)."""
    if not bns:
        return 0.0
    t0 = time.perf_counter()
    b = make_batches(s.bundle, "train", s.rt.device, s.cfg.train.eval_batch_size, train=False,
                     workers=s.cfg.data.workers)
    reestimate_bn(s.model, bns, b, s.augment, s.rt)
    seconds = time.perf_counter() - t0
    say(f"BN statistics of {len(bns)} layers the policy trains re-estimated on the training images "
        f"(AdaBN) in {seconds:.1f}s; the head and rows (a), (b) use the features of that network")
    return seconds


def start_probe(s: Setup, bns: list[nn.Module], log: MetricsLog | None):
    """The policy's starting head (lr-find's too): AdaBN on `bns`, then a probe on the train/val features."""
    adapt_seconds = adapt_bn(s, bns)
    return fit_probe(s, cached_features(s, ("train", "val")), log, extra_seconds=adapt_seconds)

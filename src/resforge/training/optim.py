"""Optimisers and learning-rate schedules.

Every schedule is a multiplier f(step) in [0, 1] applied to each parameter group's base
rate through LambdaLR, so discriminative (per-group) rates compose with any schedule and
the scheduler's state is just its step counter.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from resforge.config import OptimConfig
from resforge.training.muon import MuonWithCompanion, newton_schulz_flops


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool,
                 lr_scale: dict[str, float] | None = None, hints: dict[str, dict] | None = None,
                 muon: bool = False) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (BN weights and all biases are
    1-D, so `ndim <= 1` identifies them).  `lr_scale` maps a parameter-name prefix to a rate
    multiplier (longest prefix wins) for discriminative fine-tuning.

    `hints` (default: `model.param_group_hints()` when the model defines it) maps a parameter
    name or name prefix (longest wins) to {"frozen": bool, "lr_scale": x, "wd_scale": x,
    "weight_decay": absolute}: model-specific rules such as airbench's frozen BN scales and
    64x BN-bias rate.  Hint lr_scale multiplies the `lr_scale` table's.

    muon: the hidden filters (trainable >= 2-D weights outside the stem and the head, see
    `hidden_filters`) go to groups of their own marked "muon": True (optim.name=muon)."""
    if hints is None:
        hints = model.param_group_hints() if hasattr(model, "param_group_hints") else {}
    filters = hidden_filters(model) if muon else set()
    groups: dict[tuple[float, float, bool], list] = {}
    for name, p in model.named_parameters():
        hint = _hint_for(name, hints)
        if not p.requires_grad or hint.get("frozen", False):
            continue
        wd = 0.0 if (no_decay_norm_bias and p.ndim <= 1) else weight_decay
        wd = hint.get("weight_decay", wd * hint.get("wd_scale", 1.0))
        scale = _prefix_lookup(name, lr_scale or {}) * hint.get("lr_scale", 1.0)
        groups.setdefault((wd, scale, id(p) in filters), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": s, **({"muon": True} if m else {})}
            for (wd, s, m), ps in groups.items()]


def hidden_filters(model: nn.Module) -> set[int]:
    """ids of the >= 2-D weights Muon is meant for: all but the stem's and the head's (Muon's
    authors keep the first and last layers on a standard optimiser).  Stem and head are the first
    and last of the model's `stage_names` (docs/DESIGN.md); a model without them loses its first
    and last >= 2-D parameters.  Frozen parameters are left out by param_groups."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    names = getattr(model, "stage_names", None)
    if names and hasattr(model, "get_stage"):
        edges = {id(p) for stage in (names[0], names[-1]) for p in model.get_stage(stage).parameters()}
    else:
        edges = {id(p) for p in matrices[:1] + matrices[-1:]}
    return {id(p) for p in matrices if id(p) not in edges}


def _hint_for(name: str, hints: dict[str, dict]) -> dict:
    best = max((k for k in hints if name == k or name.startswith(k + ".")), key=len, default=None)
    return hints[best] if best is not None else {}


def _prefix_lookup(name: str, table: dict[str, float]) -> float:
    best = max((k for k in table if name == k or name.startswith(k + ".") or k == ""), key=len, default=None)
    return table[best] if best is not None else 1.0


def build_optimizer(params: Iterable | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser optim.name names over `params` (tensors, or param_groups' dicts whose
    lr_scale multiplies optim.lr; groups marked "muon" multiply optim.muon_lr instead)."""
    groups = list(params)
    if not groups:
        raise ValueError("no trainable parameters: the freezing policy left nothing to optimise")
    for g in groups:
        if isinstance(g, dict):
            g["lr"] = (cfg.muon_lr if g.get("muon") else cfg.lr) * g.pop("lr_scale", 1.0)
    if cfg.name == "muon":
        return _muon(groups, cfg)
    return _standard(cfg.name, groups, cfg)


def _standard(name: str, groups: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser '{name}': use sgd, adam, adamw or muon")


def _muon(groups: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Muon on the groups param_groups(muon=True) marked, optim.muon_companion on the rest.
    Muon's weight decay is decoupled (w <- w (1 - lr * muon_weight_decay) each step)."""
    if not all(isinstance(g, dict) for g in groups):
        raise ValueError("optim.name=muon needs param_groups(model, ..., muon=True): it must know which "
                         "parameters are the hidden filters")
    for g in groups:
        if g.get("muon"):
            g.update(weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=cfg.nesterov)
    return MuonWithCompanion(groups, lambda others: _standard(cfg.muon_companion, others, cfg),
                             ns_steps=cfg.muon_ns_steps, normalize=cfg.muon_normalize)


def optimizer_flops_per_step(model: nn.Module, cfg: OptimConfig) -> float:
    """Matrix-product FLOPs of one optimiser step: Muon's Newton-Schulz on each hidden filter seen as
    (out, rest); 0 for the element-wise optimisers (sgd, adam, adamw)."""
    if cfg.name != "muon":
        return 0.0
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias, muon=True)
    return sum(newton_schulz_flops(p.shape[0], p.numel() // p.shape[0], cfg.muon_ns_steps)
               for g in groups if g.get("muon") for p in g["params"])


def lr_factor(cfg: OptimConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base rate at optimiser step `step` of `total` (0-based)."""
    t = min(step, total) / max(total, 1)                   # progress in [0, 1]
    if cfg.schedule == "onecycle":
        # Linear rise from 1/25 to 1, then linear fall to 0 (Smith's one-cycle, as in airbench).
        p = max(cfg.pct_start, 1e-8)
        return 0.04 + 0.96 * t / p if t < p else max(0.0, (1 - t) / (1 - p))
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    u = (step - warm) / max(total - warm, 1)             # progress after warm-up
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(u, 1.0)))
    if cfg.schedule == "linear":
        return max(0.0, 1 - u)
    if cfg.schedule == "step":
        marks = [milestone_step(m, cfg.milestone_unit, total, steps_per_epoch) for m in cfg.milestones]
        return cfg.gamma ** sum(step >= m for m in marks)
    return 1.0                                              # constant


def milestone_step(m: float, unit: str, total: int, steps_per_epoch: int) -> float:
    """A step-schedule milestone as an optimiser step.  unit "step" states it in iterations, as
    He et al. do (32k/48k of 64k); "auto" keeps the old rule: <= 1 a fraction, > 1 an epoch."""
    if unit == "auto":
        unit = "fraction" if m <= 1 else "epoch"
    return {"fraction": m * total, "epoch": m * steps_per_epoch, "step": m}[unit]


def batch_scale(cfg: OptimConfig, batch_size: int) -> float:
    """optim.lr_scaling's multiplier of the peak rate for a global batch of `batch_size`: the linear
    rule (Goyal et al. 2017: k times the batch, k times the rate), its square root (adaptive
    optimisers), or 1."""
    k = batch_size / cfg.lr_base_batch
    return {"none": 1.0, "linear": k, "sqrt": k ** 0.5}[cfg.lr_scaling]


def short_run_scale(cfg: OptimConfig, total_steps: int) -> float:
    """Peak-rate multiplier of a fit with `total_steps` optimiser steps: total / optim.full_lr_steps
    below it (a short run cannot recover from a high rate's early blow-up), else 1."""
    if cfg.full_lr_steps <= 0 or total_steps >= cfg.full_lr_steps:
        return 1.0
    return max(total_steps, 1) / cfg.full_lr_steps


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * steps_per_epoch
    scale = short_run_scale(cfg, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: scale * lr_factor(cfg, s, total, steps_per_epoch))

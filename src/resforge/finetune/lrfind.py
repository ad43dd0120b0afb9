"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates", sec. 3.3).

The base rate grows geometrically from `start` to `end` over `steps` optimiser steps while
the training loss is recorded; the run stops once the smoothed loss exceeds `diverge` times
its minimum. Suggested rate: a tenth of the rate at the smoothed-loss minimum (the minimum
itself is already past the stable region). Per-group multipliers (discriminative rates,
head_lr_mult) ride along unchanged, so the suggestion is for optim.lr of the same setup.
The model's weights are restored afterwards: the test leaves no trace.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from resforge.config import OptimConfig
from resforge.data.loader import epoch_generator
from resforge.training.optim import build_optimizer, param_groups


def lr_range_test(model: nn.Module, batches, augment, rt, optim_cfg: OptimConfig, loss_fn, *,
                  lr_scale: dict | None = None, start: float = 1e-6, end: float = 1.0, steps: int = 100,
                  seed: int = 0, diverge: float = 4.0, smoothing: float = 0.9) -> dict:
    """-> {"lrs", "losses" (raw), "smoothed", "suggested", "min_loss_lr", "stopped_early"}."""
    if not 0 < start < end:
        raise ValueError(f"lr-find: need 0 < start < end, got start={start}, end={end}")
    saved = copy.deepcopy(model.state_dict())
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.no_decay_norm_bias, lr_scale)
    opt = build_optimizer(groups, dataclasses.replace(optim_cfg, lr=1.0))
    scales = [g["lr"] for g in opt.param_groups]          # per-group multipliers of the base rate
    lrs, losses, smoothed = [], [], []
    avg, best, stopped = 0.0, math.inf, False
    model.train()
    for i, (x, target) in enumerate(_stream(batches, augment, seed, steps)):
        lr = start * (end / start) ** (i / max(steps - 1, 1))
        for g, s in zip(opt.param_groups, scales):
            g["lr"] = lr * s
        with rt.autocast():
            logits = model(rt.to_input(x))
        loss = loss_fn(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        avg = smoothing * avg + (1 - smoothing) * value
        smooth = avg / (1 - smoothing ** (i + 1))          # bias-corrected running mean
        lrs.append(lr), losses.append(value), smoothed.append(smooth)
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > diverge * best:
            stopped = True
            break
    model.load_state_dict(saved)
    return {**suggest(lrs, smoothed), "lrs": lrs, "losses": losses, "smoothed": smoothed,
            "stopped_early": stopped}


def _stream(batches, augment, seed: int, steps: int):
    """(x, target) for `steps` steps, cycling epochs of the training batches."""
    n, epoch = 0, 0
    while n < steps:
        g = epoch_generator(seed, epoch, batches.device if hasattr(batches, "device") else "cpu")
        for x_u8, y, idx in batches.batches(g):
            if n == steps:
                return
            yield augment(x_u8, y, idx, epoch, g)
            n += 1
        epoch += 1


def suggest(lrs: list[float], smoothed: list[float]) -> dict:
    if len(lrs) < 3:
        raise ValueError(f"lr-find: only {len(lrs)} steps ran before the loss diverged; "
                         "lower --start-lr or check the data")
    finite = np.array([v if math.isfinite(v) else np.inf for v in smoothed])
    i_min = int(np.argmin(finite))
    return {"suggested": lrs[i_min] / 10, "min_loss_lr": lrs[i_min]}


def plot_lr_find(result: dict, out_png: Path, title: str = "learning-rate range test") -> Path:
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"], color="0.75", lw=1, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=2, label="smoothed")
    ax.axvline(result["suggested"], color="C3", ls="--", label=f"suggested {result['suggested']:.2e}")
    ax.axvline(result["min_loss_lr"], color="0.5", ls=":", label=f"loss minimum {result['min_loss_lr']:.2e}")
    ax.set_xscale("log")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), min(max(finite), 3 * min(finite) + 1e-9)
        ax.set_ylim(lo - 0.1 * (hi - lo) - 1e-6, hi + 0.1 * (hi - lo) + 1e-6)
    ax.set_xlabel("base learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png

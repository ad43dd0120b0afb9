"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates", sec. 3.3).

The base rate grows geometrically from `start` to `end` over `steps` optimiser steps while
the training loss is recorded; the run stops once the smoothed loss exceeds `diverge` times
its minimum. Suggested rate: a tenth of the rate at the smoothed-loss minimum (the minimum
itself is already past the stable region). Per-group multipliers (discriminative rates,
head_lr_mult) ride along unchanged, so the suggestion is for optim.lr of the same setup.
The model's weights are restored afterwards: the test leaves no trace.
`lr_find` (below) is the command: it builds the setup a `finetune` or `train` run would use.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from resforge.config import OptimConfig, RunConfig
from resforge.data.augment import Augmenter
from resforge.data.loader import epoch_generator
from resforge.finetune import policies as P
from resforge.finetune.probe import FeatureBatches, IdentityAugment, probe_configs, probe_head
from resforge.finetune.setup import build_setup, cached_features, resolve_config, say, start_probe
from resforge.pipeline import build_model, normalisation, prepare_data, start_runtime, train_batches
from resforge.runs import new_run_dir
from resforge.training.loop import soft_cross_entropy
from resforge.training.optim import build_optimizer, param_groups


def lr_range_test(model: nn.Module, batches, augment, rt, optim_cfg: OptimConfig, loss_fn, *,
                  lr_scale: dict | None = None, start: float = 1e-6, end: float = 1.0, steps: int = 100,
                  seed: int = 0, diverge: float = 4.0, smoothing: float = 0.9) -> dict:
    """-> {"lrs", "losses" (raw), "smoothed", "suggested", "min_loss_lr", "stopped_early"}."""
    if not 0 < start < end:
        raise ValueError(f"lr-find: need 0 < start < end, got start={start}, end={end}")
    if optim_cfg.name == "muon":
        raise ValueError("lr-find sweeps optim.lr, which optim.name=muon leaves to the companion while the filters "
                         "follow optim.muon_lr: run it with optim.name=sgd (the companion's rate)")
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


# ---------------------------------------------------------------- the lr-find command

def lr_find(source: str | Path | None = None, *, data: str | None = None, policy: str | None = None,
            recipe: str | None = None, overrides: list[str] | dict | None = None, model: str | None = None,
            start: float = 1e-6, end: float = 1.0, steps: int = 100, out: str | Path | None = None,
            config: RunConfig | None = None) -> dict:
    """Learning-rate range test for the setup a `finetune` (source given) or `train` (no source:
    the recipe's model) run would use; writes lr_find.png and lr_find.json. -> the result dict
    with "suggested" (a value for optim.lr)."""
    cfg = resolve_config(recipe, overrides, data=data, policy=policy, source=source, config=config)
    if source is None:
        net, batches, augment, rt, lr_scale, loss_fn, optim, what = _scratch_target(cfg)
    else:
        net, batches, augment, rt, lr_scale, loss_fn, optim, what = _finetune_target(cfg, source, model)
    res = lr_range_test(net, batches, augment, rt, optim, loss_fn, lr_scale=lr_scale, start=start, end=end,
                        steps=steps, seed=cfg.train.seed)
    out_dir = Path(out) if out else new_run_dir(cfg.train.project, cfg.train.name or "lr-find")
    out_dir.mkdir(parents=True, exist_ok=True)
    res["target"] = what
    res["plot"] = str(plot_lr_find(res, out_dir / "lr_find.png", f"lr range test: {what}"))
    (out_dir / "lr_find.json").write_text(json.dumps(res, indent=2))
    key = "finetune.probe_lr" if what.endswith("(linear probe)") else "optim.lr"
    say(f"lr-find ({what}): loss minimum at {res['min_loss_lr']:.3g}; suggested {key}={res['suggested']:.3g}"
         f"\nplot: {res['plot']}")
    return res


def _scratch_target(cfg: RunConfig):
    rt = start_runtime(cfg)
    bundle, _ = prepare_data(cfg)
    net, _, pre = build_model(cfg, len(bundle.class_names), bundle.channels)
    mean, std = normalisation(pre, bundle)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), bundle.image_size, seed=cfg.train.seed)
    tb = train_batches(cfg, bundle, rt)
    return (net.to(rt.device), tb, augment, rt, None, soft_cross_entropy(cfg.optim.label_smoothing), cfg.optim,
            f"{cfg.model.name} from scratch")


def _finetune_target(cfg: RunConfig, source, model_name):
    """The main (last) phase of the policy, after its probe phase when it has one."""
    s = build_setup(cfg, source, model_name)
    last = s.phases[-1]
    if s.phases[0].kind == "probe":
        if last.kind == "probe":                        # linear-probe: the range test is the probe's
            feats = cached_features(s, ("train",))
            o, _ = probe_configs(cfg.optim, cfg.train, 1, cfg.finetune.probe_lr, cfg.finetune.probe_weight_decay)
            head = probe_head(s.model.fc, *feats["train"], cfg).to(s.rt.device)
            fb = FeatureBatches(*feats["train"], min(cfg.train.batch_size, len(feats["train"][1])), shuffle=True,
                                sample_weights=s.sample_weights, device=s.rt.device)
            return head, fb, IdentityAugment(), s.rt, None, s.loss_fn, o, f"{s.pre.arch} {cfg.finetune.policy} (linear probe)"
        adapt = P.bn_to_adapt(s.model, s.phases, s.bn)
        head = start_probe(s, adapt, None)[0]         # as finetune() does: the head fits the start
        s.model.fc.load_state_dict(head.model_fc_state())
    if last.params == "lora":
        P.add_lora(s.model, cfg.finetune)
    P.apply_phase(s.model, last, s.bn)
    return (s.model, s.train_batches, s.augment, s.rt, last.lr_scale, s.loss_fn, cfg.optim,
            f"{s.pre.arch} {cfg.finetune.policy}, phase '{last.name}'")

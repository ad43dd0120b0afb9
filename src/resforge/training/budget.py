"""Size the schedule to a time budget (`train.max_seconds` + `train.fit_budget=true`).

`train.max_seconds` alone cuts a run at the epoch boundary nearest the budget. For one-cycle or
cosine schedules that stops training at a high learning rate -- usually the worst weights of
the run. Sizing the epoch count first makes the whole schedule, rate annealed to its end, fit
inside the budget instead. Measured, not guessed: a few real training steps (same batches,
augmentation, optimiser and precision) on a throw-away copy of the model, and a few eval batches.

    epoch seconds  ~= train batches * step seconds + images evaluated per epoch * eval seconds per image
    epochs          = floor(margin * budget / epoch seconds)         (at least 1)
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from resforge import distributed as D
from resforge.config import OptimConfig, TrainConfig
from resforge.data.augment import Augmenter
from resforge.data.loader import epoch_generator
from resforge.training.device import Runtime
from resforge.training.loop import FitState, Updater, forward_loss
from resforge.training.optim import build_optimizer, param_groups
from resforge.training.probes import GradNormMeter

MARGIN = 0.95          # checkpoint writes, first-epoch warm-up, a noisy CPU
WARMUP, STEPS = 2, 6   # untimed, then timed training steps


@dataclass
class BudgetPlan:
    epochs: int
    step_seconds: float            # one optimiser step, data and augmentation included
    eval_seconds: float            # per-epoch evaluations (val + training-error subset)
    epoch_seconds: float

    def describe(self, budget: float) -> str:
        return (f"train.fit_budget: {self.epochs} epochs fit train.max_seconds={budget:g} "
                f"(timed: {self.step_seconds:.3f} s/step, ~{self.epoch_seconds:.1f} s/epoch incl. "
                f"{self.eval_seconds:.1f} s of evaluation)")


def plan_epochs(budget: float, model: nn.Module, train_batches, eval_batches: list, augment: Augmenter,
                rt: Runtime, optim_cfg: OptimConfig, train_cfg: TrainConfig, loss_fn: Callable) -> BudgetPlan:
    """How many epochs of this run fit in `budget` seconds. eval_batches: the splits evaluated
    every train_cfg.val_every epochs (None entries are skipped). Leaves the model, the RNG
    streams and the batches as they were."""
    probe = copy.deepcopy(model)
    evals = [b for b in eval_batches if b is not None]
    cuda = [rt.device.index or 0] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        step_s = _time_steps(probe, train_batches, augment, rt, optim_cfg, train_cfg, loss_fn)
        per_image = _time_eval(probe, evals, augment, rt)
    eval_s = sum(b.num_images for b in evals) * per_image / train_cfg.val_every
    epoch_s = len(train_batches) * step_s + eval_s
    epochs = D.agree_min(max(1, math.floor(MARGIN * budget / epoch_s)))   # every rank runs one schedule
    return BudgetPlan(epochs, step_s, eval_s, epoch_s)


def _time_steps(model: nn.Module, batches, augment: Augmenter, rt: Runtime, optim_cfg: OptimConfig,
                train_cfg: TrainConfig, loss_fn: Callable) -> float:
    """Median seconds of one training step (batch fetch + augmentation + forward/backward + update,
    with the run's clipping and gradient-norm probes), after WARMUP untimed steps."""
    opt = build_optimizer(param_groups(model, optim_cfg.weight_decay, optim_cfg.no_decay_norm_bias, None,
                                       muon=optim_cfg.name == "muon"), optim_cfg)
    updater = Updater(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), clip_grad=optim_cfg.clip_grad,
                      grad_meter=GradNormMeter(model) if train_cfg.grad_norms else None)
    model.train()
    g = epoch_generator(train_cfg.seed, 0, rt.device)
    it = iter(batches.batches(g))
    times, state = [], FitState()
    t = time.perf_counter()
    for batch in itertools.islice(it, WARMUP + STEPS):
        updater.backward(forward_loss(model, batch, augment, rt, loss_fn, 0, g)[2])
        updater.step(model, state)
        _sync(rt)
        now = time.perf_counter()
        times.append(now - t)
        t = now
    if hasattr(it, "close"):
        it.close()                                  # stops a streaming loader's workers
    if not times:
        raise ValueError("the training split produced no batch: it is empty or smaller than one batch")
    timed = times[WARMUP:] or times
    return float(sorted(timed)[len(timed) // 2])


@torch.no_grad()
def _time_eval(model: nn.Module, splits: list, augment: Augmenter, rt: Runtime, batches: int = 2) -> float:
    """Seconds per evaluated image (eval mode, no TTA), from the first split's first batches
    (the very first one, which pays the warm-up, only if it is the only one)."""
    if not splits:
        return 0.0
    model.eval()
    it = iter(splits[0].batches(None))
    timed = []                                      # (images, seconds) per batch
    for x_u8, _, _ in itertools.islice(it, batches + 1):
        t = time.perf_counter()
        with rt.autocast():
            model(rt.to_input(augment.eval_view(x_u8)))
        _sync(rt)
        timed.append((len(x_u8), time.perf_counter() - t))
    if hasattr(it, "close"):
        it.close()
    timed = timed[1:] or timed
    return sum(s for _, s in timed) / max(1, sum(n for n, _ in timed))


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)

"""Training steps timed two ways on one model: bare (the compute floor) and resforge's own.

    BareStep      forward + loss + backward + optimiser step on one synthetic batch already in
                  memory, normalised and in the run's layout: no data pipeline, no augmentation,
                  no loop bookkeeping. What the model's arithmetic costs on this machine.
    PipelineStep  resforge's training step as `fit` runs it: the run's TensorBatches over real
                  images, the Augmenter, train_one_epoch and an Updater with the recipe's
                  optimiser, schedule, clipping, lookahead, EMA and gradient-norm probes.
    BareEval      eval-mode forwards of a synthetic batch (no gradients).

Each has run(steps) -> wall seconds of that many steps, so a caller can interleave them (a
shared, busy CPU drifts; alternating the two cancels most of the drift). Neither applies
train.compile: its minutes of compilation would swamp a short measurement.
"""
from __future__ import annotations

import itertools
import math
import time

import torch
from torch import nn

from resforge.config import RunConfig
from resforge.data.augment import Augmenter
from resforge.training.device import Runtime
from resforge.training.ema import EMA
from resforge.training.lookahead import Lookahead
from resforge.training.loop import FitState, Updater, soft_cross_entropy, train_one_epoch
from resforge.training.optim import build_optimizer, build_scheduler, param_groups
from resforge.training.probes import GradNormMeter


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return build_optimizer(param_groups(model, o.weight_decay, o.no_decay_norm_bias), o)


class BareStep:
    """The floor: the model's training arithmetic on a batch that is already there."""

    def __init__(self, model: nn.Module, cfg: RunConfig, rt: Runtime, input_shape, num_classes: int):
        self.model, self.rt = model, rt
        self.batch = cfg.train.batch_size
        g = torch.Generator().manual_seed(0)
        self.x = rt.to_input(torch.randn(self.batch, *input_shape, generator=g).to(rt.device))
        self.y = torch.randint(0, num_classes, (self.batch,), generator=g).to(rt.device)
        self.opt = _optimizer(model, cfg)
        self.loss = soft_cross_entropy(cfg.optim.label_smoothing)

    def run(self, steps: int) -> float:
        self.model.train()
        t0 = time.perf_counter()
        for _ in range(steps):
            with self.rt.autocast():
                logits = self.model(self.x)
            self.loss(logits, self.y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.rt)
        return time.perf_counter() - t0


class BareEval:
    """The floor of evaluation: eval-mode forwards of a synthetic batch (one view per image) at
    min(train.eval_batch_size, train.batch_size)."""

    def __init__(self, model: nn.Module, cfg: RunConfig, rt: Runtime, input_shape):
        self.model, self.rt = model, rt
        # Per-image eval cost barely depends on the batch past a few dozen images; the training
        # batch bounds it so a 1000-image eval batch of a big model does not take seconds a call.
        self.batch = min(cfg.train.eval_batch_size, cfg.train.batch_size)
        g = torch.Generator().manual_seed(1)
        self.x = rt.to_input(torch.randn(self.batch, *input_shape, generator=g).to(rt.device))

    @torch.no_grad()
    def run(self, steps: int) -> float:
        self.model.eval()
        t0 = time.perf_counter()
        for _ in range(steps):
            with self.rt.autocast():
                self.model(self.x)
        _sync(self.rt)
        return time.perf_counter() - t0


class FirstBatches:
    """The first n batches of a batches object, with the interface train_one_epoch and
    predict_logits read (batches(g), len, num_images, sharded)."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, max(1, min(n, len(inner)))
        self.batch_size = getattr(inner, "batch_size", None)
        self.sharded = getattr(inner, "sharded", False)

    def __len__(self) -> int:
        return self.n

    @property
    def num_images(self) -> int:
        return min(self.inner.num_images, self.n * (self.batch_size or self.inner.num_images))

    def batches(self, g=None):
        it = self.inner.batches(g)
        try:
            yield from itertools.islice(it, self.n)
        finally:
            if hasattr(it, "close"):
                it.close()                      # a streaming loader's workers stop here


class PipelineStep:
    """resforge's real step: what fit does per batch, minus validation and checkpoints."""

    def __init__(self, model: nn.Module, cfg: RunConfig, rt: Runtime, train_batches, augment: Augmenter):
        self.model, self.cfg, self.rt, self.batches, self.augment = model, cfg, rt, train_batches, augment
        t, o = cfg.train, cfg.optim
        opt = _optimizer(model, cfg)
        sched = build_scheduler(opt, o, t.epochs, len(train_batches))
        ema = EMA(model, t.ema, t.ema_every) if t.ema else None
        if t.lookahead_every:
            Lookahead(model, t.lookahead_every, t.lookahead_alpha, t.epochs * len(train_batches)).attach(opt, model)
        self.updater = Updater(opt, sched, None, o.clip_grad, GradNormMeter(model) if t.grad_norms else None, ema)
        self.loss = soft_cross_entropy(o.label_smoothing)
        self.state, self.epoch = FitState(), 0

    @property
    def batch(self) -> int:
        return self.cfg.train.batch_size

    def run(self, steps: int) -> float:
        """Wall seconds of `steps` steps: the first batches of an epoch, more epochs if the
        split has fewer batches (each call, or epoch, draws another epoch's order)."""
        seconds = 0.0
        while steps > 0:
            n = min(steps, len(self.batches))
            seconds += train_one_epoch(self.model, FirstBatches(self.batches, n), self.augment, self.updater,
                                       self.rt, self.loss, epoch=self.epoch, seed=self.cfg.train.seed,
                                       state=self.state, progress=False,
                                       accumulate=self.cfg.train.accumulate)["seconds"]
            self.epoch, steps = self.epoch + 1, steps - n
        return seconds


def steps_for(seconds: float, step_seconds: float, at_least: int = 2, at_most: int = 200) -> int:
    """How many steps of step_seconds fill `seconds` (at least at_least: one step is no rate)."""
    return max(at_least, min(at_most, math.ceil(seconds / max(step_seconds, 1e-9))))

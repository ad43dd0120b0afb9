"""The training loop as plain functions: one epoch, inference over a split, and `fit`.

`fit` owns validation, early stopping, checkpointing and resume; everything it needs comes in
as arguments (no global state), so fine-tuning policies compose it (freeze -> fit ->
unfreeze -> fit) instead of copying it. Under torch.distributed (resforge/distributed.py) the
steps run through DistributedDataParallel on each rank's share of the global batch, evaluation
gathers every rank's logits, and only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from resforge import distributed as D
from resforge import progress as P
from resforge.config import OptimConfig, TrainConfig
from resforge.data.augment import Augmenter
from resforge.data.loader import epoch_generator
from resforge.runs import MetricsLog, is_main_process
from resforge.training.device import Runtime
from resforge.training import health
from resforge.training.ema import EMA
from resforge.training.lookahead import Lookahead
from resforge.training.optim import batch_scale, build_optimizer, build_scheduler, param_groups, short_run_scale
from resforge.training.probes import GradNormMeter, prefixed_metrics


@dataclass
class FitState:
    """Everything besides weights and optimiser that a resumed run must get back."""
    epoch: int = 0                     # epochs completed
    step: int = 0                      # optimiser steps taken
    best: float | None = None          # best monitored value so far
    best_epoch: int = 0
    bad_rounds: int = 0                # validations since the best (early stopping)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0               # wall seconds of training so far, over all resumed sessions
    timed_epochs: int = 0              # epochs those seconds cover (fewer: resumed from a state without them)
    images_seen: int = 0               # training images through forward+backward, over all sessions
    pass_seconds: float = 0.0          # the part of `seconds` spent in training passes (no evaluation)
    eval_images: int = 0               # images through evaluation forwards while training (val, train_eval)


def soft_cross_entropy(label_smoothing: float, weight: torch.Tensor | None = None) -> Callable:
    """Cross-entropy in fp32 for hard (B,) or soft (B, K) targets (mixup/cutmix);
    `weight` (K,) weighs classes (imbalanced fine-tuning sets)."""
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = None if weight is None else weight.to(logits.device)
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=label_smoothing)
    return loss


@dataclass
class Updater:
    """How a batch's loss becomes a parameter update: the optimiser and its schedule, plus the
    optional pieces around them (fp16 loss scaling, gradient clipping, per-stage gradient norms,
    EMA of the weights). One object, so the epoch function reads like the maths."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    grad_meter: GradNormMeter | None = None
    ema: EMA | None = None

    def backward(self, loss: torch.Tensor) -> None:
        """Add d(loss)/d(weights) to the gradients (several calls accumulate micro-batches)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, model: nn.Module, state: FitState) -> None:
        """One optimiser step on the accumulated gradients, then clear them."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)         # clip and measure true gradients
        if self.grad_meter is not None:            # raw (unclipped) per-stage norms
            self.grad_meter.update()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        state.step += 1
        if self.ema is not None:
            self.ema.update(model, state.step)


def forward_loss(model: nn.Module, batch, augment: Augmenter, rt: Runtime, loss_fn: Callable, epoch: int,
                 g: torch.Generator, batch_loss: Callable | None = None):
    """uint8 batch -> (logits (B, K), target (B,) or (B, K), loss): augmentation on the device,
    forward under the run's precision, loss in fp32. batch_loss(logits, target, x, batch), when
    given, is the loss instead of loss_fn(logits, target): for losses that need the augmented input
    x the model saw or which rows of the batch are which (batch = (x_u8, y, idx) as the batches
    yielded it), e.g. continual learning's distillation and replayed logits (continual/methods.py)."""
    x_u8, y, idx = batch
    x, target = augment(x_u8, y, idx, epoch, g)
    with rt.autocast():
        logits = model(rt.to_input(x))
    if batch_loss is not None:
        return logits, target, batch_loss(logits, target, x, batch)
    return logits, target, loss_fn(logits, target)


def train_one_epoch(model: nn.Module, batches, augment: Augmenter, updater: Updater, rt: Runtime,
                    loss_fn: Callable, *, epoch: int, seed: int, state: FitState,
                    progress: bool = True, desc: str = "", batch_loss: Callable | None = None,
                    accumulate: int = 1) -> dict:
    """One pass over `batches`: augment on the device, forward, loss, update. -> epoch statistics
    (train_loss, train_acc, images, seconds, and grad_norm_<stage> when the updater measures them),
    over every rank's images when the batches are sharded (torch.distributed).
    accumulate: each batch is cut into this many micro-batches whose gradients add up to one step
    (the same update in less memory; under DDP only the last one all-reduces)."""
    model.train()
    g = epoch_generator(seed, epoch, rt.device)
    total_loss = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    seen, t0 = 0, time.perf_counter()
    bar = P.Bar(batches.batches(g), total=len(batches), desc=desc, unit="batch", enabled=progress,
                announce=False)                 # off a terminal the epoch lines are the log
    for i, batch in enumerate(bar):
        n = len(batch[1])
        micro = list(zip(*(t.chunk(accumulate) for t in batch))) if accumulate > 1 else [batch]
        for j, part in enumerate(micro):
            sync = j == len(micro) - 1 or not hasattr(model, "no_sync")   # DDP: all-reduce once a step
            with contextlib.nullcontext() if sync else model.no_sync():
                logits, target, loss = forward_loss(model, part, augment, rt, loss_fn, epoch, g, batch_loss)
                updater.backward(loss * (len(part[1]) / n))            # mean over the whole batch
            # Accumulate on device: no host sync per step (it would stall a GPU pipeline).
            hard = target if target.ndim == 1 else target.argmax(1)
            total_loss += loss.detach() * len(part[1])
            correct += (logits.argmax(1) == hard).sum()
        updater.step(model, state)
        seen += n
        if i % 10 == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    if getattr(batches, "sharded", False):      # every rank's images: the loss one process would report
        total_loss, correct, seen_t = D.all_sum(total_loss, correct, torch.tensor(float(seen), device=rt.device))
        seen = int(seen_t.item())
    seconds = time.perf_counter() - t0
    if seen == 0:
        raise ValueError("the training split produced no batch: it is empty or smaller than one batch")
    grads = updater.grad_meter.epoch_means() if updater.grad_meter is not None else {}
    return {"train_loss": total_loss.item() / seen, "train_acc": correct.item() / seen,
            "images": seen, "seconds": seconds, **grads}


@torch.no_grad()
def predict_logits(model: nn.Module, batches, augment: Augmenter, rt: Runtime,
                   tta: bool = False, desc: str = "evaluating") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) fp32 on CPU and labels (N,) for a whole split, in the split's order; with
    `tta` the mean over the views the augmenter declares (Augmenter.tta_views). desc: the
    progress bar's label (resforge.progress)."""
    model.eval()
    outs, labels = [], []
    with P.Bar(desc=desc, total=getattr(batches, "num_images", None)) as bar:
        for x_u8, y, _ in batches.batches(None):
            x = augment.eval_view(x_u8)
            views = augment.tta_views(x) if tta else [x]
            with rt.autocast():
                logits = sum(model(rt.to_input(v)).float() for v in views) / len(views)
            outs.append(logits.cpu())
            labels.append(y.cpu())
            bar.update(len(y))
    logits, labels = torch.cat(outs), torch.cat(labels)
    if getattr(batches, "sharded", False):      # every rank's slice, in the split's order
        logits, labels = D.gather_rows(logits), D.gather_rows(labels)
    return logits, labels


BN_RECALIBRATE_STEPS = 1000        # train.bn_recalibrate=auto: fits with fewer optimiser steps are recalibrated
BN_RECALIBRATE_IMAGES = 4096       # images per recalibration pass (a strided sample of a bigger training set)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, augment: Augmenter, rt: Runtime, *, bns: list[nn.Module] | None = None,
                   max_images: int | None = None, generator: torch.Generator | None = None) -> int:
    """Replace BatchNorm running statistics by a cumulative average over one pass of un-augmented
    images (`augment.eval_view`, what evaluation sees); no weight changes. -> images used.

    The running averages (momentum 0.1) trail the weights: after a few dozen steps at a high rate
    they describe earlier weights and eval mode collapses (digits, 1 epoch: val loss 712, 10% test).
    bns: the layers to recalibrate (default: every BN layer); a layer that a forward pre-hook
    keeps in eval mode (fine-tuning's frozen statistics) is never touched, every other layer
    runs in eval mode (dropout off)."""
    bns = _batchnorms(model) if bns is None else list(bns)
    if not bns:
        return 0
    model.eval()
    momenta, started = {m: m.momentum for m in bns}, set()

    def reset_on_first_forward(m, args):
        # runs after any earlier pre-hook: a layer locked in eval mode is seen as such and kept
        if m.training and m not in started:
            m.reset_running_stats()
            m.momentum = None                       # cumulative average over the pass
            started.add(m)

    hooks = [m.register_forward_pre_hook(reset_on_first_forward) for m in bns]
    try:
        for m in bns:
            m.train()
        seen = 0
        with P.Bar(desc="re-estimating BN statistics", total=_images(batches, max_images)) as bar:
            for x_u8, _, _ in batches.batches(generator):
                with rt.autocast():
                    model(rt.to_input(augment.eval_view(x_u8)))
                seen += len(x_u8)
                bar.update(len(x_u8))
                if max_images is not None and seen >= max_images:
                    break
    finally:
        for h in hooks:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.eval()
    if getattr(batches, "sharded", False):      # each rank saw its shard: statistics of them all
        D.average_bn_statistics([m for m in bns if m in started])
        seen = int(D.all_sum(torch.tensor(float(seen)))[0].item())
    return seen if started else 0


def _images(batches, cap: int | None) -> int | None:
    n = getattr(batches, "num_images", None)
    return n if cap is None or n is None else min(n, cap)


def _wants_recalibration(cfg: TrainConfig, steps: int) -> bool:
    return cfg.bn_recalibrate == "always" or (cfg.bn_recalibrate == "auto" and steps < BN_RECALIBRATE_STEPS)


def val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_acc": (logits.argmax(1) == labels).float().mean().item()}


def _improved(cfg: TrainConfig, value: float, best: float | None) -> bool:
    if not math.isfinite(value):                 # a diverged epoch is never the best one
        return False
    if best is None:
        return True
    return value > best if cfg.monitor == "val_acc" else value < best


@dataclass
class FitResult:
    model: nn.Module                   # the weights to use (EMA if enabled; best if restored)
    state: FitState
    train_seconds: float               # over the whole run, resumed sessions included (state.timed_epochs)
    bn_recalibration: dict | None = None  # what recalibrate_bn did at the end (None: not done)


def fit(model: nn.Module, train_batches, val_batches, augment: Augmenter, rt: Runtime,
        optim_cfg: OptimConfig, train_cfg: TrainConfig, *, checkpointer=None, resume: dict | None = None,
        metrics_log: MetricsLog | None = None, lr_scale: dict[str, float] | None = None,
        desc: str = "", train_eval_batches=None, loss_fn: Callable | None = None,
        batch_loss: Callable | None = None) -> FitResult:
    """Train `model` for train_cfg.epochs with periodic validation; returns the weights to use.

    checkpointer(tag, model, state, extra) writes 'last' (+ resume state) and 'best';
    resume is a state dict written by an earlier call with the same arguments.
    train_eval_batches (optional, un-augmented training images) adds train_eval_loss/_acc to
    every epoch's row; train_cfg.grad_norms adds grad_norm_<stage> (probes.py).
    batch_loss(logits, target, x, batch): a training loss that needs more than (logits, target)
    (see forward_loss); train_batches may be any object with batches(g), __len__ and num_images,
    e.g. one that mixes replayed images into every batch (continual/methods.py).
    Under torch.distributed (train_batches sharded) the steps run through DistributedDataParallel."""
    if optim_cfg.lr_scaling != "none":
        k = batch_scale(optim_cfg, train_cfg.batch_size)
        if resume is None:
            _log(f"{desc}optim.lr_scaling={optim_cfg.lr_scaling}: peak rate {optim_cfg.lr:g} x {k:.4g} = "
                 f"{optim_cfg.lr * k:.4g} for the global batch {train_cfg.batch_size} "
                 f"(optim.lr_base_batch={optim_cfg.lr_base_batch})")
        optim_cfg = replace(optim_cfg, lr=optim_cfg.lr * k)
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.no_decay_norm_bias, lr_scale,
                          muon=optim_cfg.name == "muon")
    opt = build_optimizer(groups, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, train_cfg.epochs, len(train_batches))
    total_steps = train_cfg.epochs * len(train_batches)
    if short_run_scale(optim_cfg, total_steps) < 1 and resume is None:
        _log(f"{desc}short run: {total_steps} optimiser steps < optim.full_lr_steps={optim_cfg.full_lr_steps}, "
             f"so the peak rate is {optim_cfg.lr * short_run_scale(optim_cfg, total_steps):.3g} "
             f"(optim.lr={optim_cfg.lr:g} x {total_steps}/{optim_cfg.full_lr_steps})")
    ema = EMA(model, train_cfg.ema, train_cfg.ema_every) if train_cfg.ema else None
    lookahead = (Lookahead(model, train_cfg.lookahead_every, train_cfg.lookahead_alpha,
                           train_cfg.epochs * len(train_batches)) if train_cfg.lookahead_every else None)
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
    state, best_weights = FitState(), None
    if resume is not None:
        state, best_weights = _restore(resume, model, opt, sched, ema, scaler, lookahead)
    if metrics_log is not None:                # rows past the restored epoch (a restart: all) are a killed session's
        metrics_log.truncate(state.epoch)
    step_model = model
    if getattr(train_batches, "sharded", False):
        D.shard_check(train_cfg.batch_size, train_cfg.accumulate)
        step_model = D.wrap(model, rt.device, train_cfg.sync_bn)      # sync_bn: only where batches are split
    step_model = torch.compile(step_model) if train_cfg.compile else step_model
    loss_fn = loss_fn or soft_cross_entropy(optim_cfg.label_smoothing)
    updater = Updater(opt, sched, scaler, optim_cfg.clip_grad,
                      GradNormMeter(model) if train_cfg.grad_norms else None, ema)
    if lookahead is not None:
        lookahead.attach(opt, model)           # syncs after every optimiser step
    t0 = time.perf_counter() - state.seconds   # a resumed run keeps its clock: max_seconds spans all sessions
    if state.epoch and not state.images_seen:  # resumed from a state written before these counters
        state.images_seen = state.epoch * train_batches.num_images
    for epoch in range(state.epoch, train_cfg.epochs):
        wall_before = state.seconds            # the previous row's wall_seconds: the columns add up
        stats = train_one_epoch(step_model, train_batches, augment, updater, rt, loss_fn,
                                epoch=epoch, seed=train_cfg.seed, state=state, progress=train_cfg.progress,
                                desc=f"{desc}epoch {epoch + 1}/{train_cfg.epochs}", batch_loss=batch_loss,
                                accumulate=train_cfg.accumulate)
        state.seconds, state.timed_epochs = time.perf_counter() - t0, state.timed_epochs + 1
        state.images_seen += stats["images"]
        state.pass_seconds += stats["seconds"]
        # every rank must stop after the same epoch: the first one out of time stops them all
        out_of_time = D.agree_any(_out_of_time(train_cfg.max_seconds, state.seconds, state.timed_epochs))
        if lookahead is not None and (out_of_time or epoch + 1 == train_cfg.epochs):
            lookahead.finish(model)            # the model evaluated and saved is the slow one
        eval_model = ema.module if ema is not None else model
        D.settle(eval_model)                   # BN statistics of every rank's images: one model on all ranks
        row = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0],
               "train_loss": stats["train_loss"], "train_acc": stats["train_acc"]}
        if train_eval_batches is not None:
            logits, labels = predict_logits(eval_model, train_eval_batches, augment, rt)
            row |= prefixed_metrics(logits, labels, "train_eval")
            state.eval_images += len(labels)
        row |= {k: v for k, v in stats.items() if k.startswith("grad_norm_")}
        last = epoch + 1 == train_cfg.epochs or out_of_time
        weights_ok = _weights_finite(eval_model)
        stop = False
        if val_batches is not None and ((epoch + 1) % train_cfg.val_every == 0 or last):
            logits, labels = predict_logits(eval_model, val_batches, augment, rt)
            row |= val_metrics(logits, labels)
            state.eval_images += len(labels)
            classes = logits.shape[1]
            value = row[train_cfg.monitor]
            if weights_ok and _finite(row) and _improved(train_cfg, value, state.best):
                state.best, state.best_epoch, state.bad_rounds = value, epoch + 1, 0
                best_weights = copy.deepcopy(eval_model.state_dict())
                if checkpointer is not None:
                    checkpointer("best", eval_model, state, row)
            else:
                state.bad_rounds += 1
                stop = train_cfg.patience is not None and state.bad_rounds >= train_cfg.patience
        state.epoch, state.seconds = epoch + 1, time.perf_counter() - t0       # seconds: evaluation included
        row |= time_columns(state, state.seconds - wall_before)
        state.history.append(row)
        if metrics_log is not None:
            metrics_log.append(row)
        _report_epoch(row, stats, train_cfg, desc)
        if "val_loss" in row and row["val_loss"] > health.exploded_limit(classes):   # now, not after 30 epochs
            _log(f"{desc}  val_loss {row['val_loss']:.4g} is over {health.EXPLODED_FACTOR:g}x ln({classes}): the "
                 f"learning rate is too high for this data (optim.lr={optim_cfg.lr:g}; `resforge lr-find` suggests one)")
        if not (weights_ok and _finite(row)):            # no "last" checkpoint of nan weights
            _diverged(row, weights_ok, train_cfg, state, best_weights is not None, desc)
            break
        if checkpointer is not None:
            checkpointer("last", eval_model, state, row,
                         resume=_snapshot(state, model, opt, sched, ema, scaler, best_weights, lookahead))
        if stop:
            _log(f"{desc}early stop: {train_cfg.monitor} has not improved for "
                 f"{train_cfg.patience} validations (best {state.best:.4f} at epoch {state.best_epoch})")
            break
        if out_of_time and epoch + 1 < train_cfg.epochs:
            _log(f"{desc}time budget train.max_seconds={train_cfg.max_seconds:g} reached after epoch {epoch + 1}")
            break
    final = ema.module if ema is not None else model
    restored = train_cfg.restore_best and best_weights is not None
    if restored:
        final.load_state_dict(best_weights)
    recal = None
    if state.epoch > 0 and _wants_recalibration(train_cfg, state.step):
        recal, row, tags = _recalibrate_final(final, train_batches, val_batches, augment, rt, train_cfg, state,
                                              restored, desc)
        for tag in tags if checkpointer is not None else ():    # eval/predict/export load what was tested
            checkpointer(tag, final, state, row, resume=None if tag == "best" else
                         _snapshot(state, model, opt, sched, ema, scaler, best_weights, lookahead))
    return FitResult(final, state, state.seconds, recal)


def time_columns(state: FitState, epoch_seconds: float) -> dict:
    """metrics.csv's time-to-accuracy columns: this epoch's wall seconds (its training pass, its
    evaluation and the previous epoch's checkpoint), and since the run began (resumed sessions
    included; the unfinished epoch of a killed session is not counted) the wall seconds, the
    seconds in training passes alone, and the training images seen."""
    return {"epoch_seconds": epoch_seconds, "wall_seconds": state.seconds,
            "train_seconds": state.pass_seconds, "images_seen": state.images_seen}


def _recalibrate_final(final: nn.Module, train_batches, val_batches, augment: Augmenter, rt: Runtime,
                       cfg: TrainConfig, state: FitState, restored: bool, desc: str) -> tuple[dict | None, dict, list]:
    """recalibrate_bn on the weights fit returns and re-validate them. -> (what was done, or None
    when no BN layer runs in train mode; their metrics row; the checkpoint tags holding them)."""
    t0 = time.perf_counter()
    trained = {k: v.clone() for k, v in final.state_dict().items() if _is_bn_buffer(k)}
    g = epoch_generator(cfg.seed, cfg.epochs, rt.device)   # its own fixed stream: a resumed run does the same
    n = recalibrate_bn(final, train_batches, augment, rt, max_images=BN_RECALIBRATE_IMAGES, generator=g)
    if n == 0:
        return None, {}, []
    info = {"images": n, "steps": state.step, "mode": cfg.bn_recalibrate, "kept": True}
    epoch = state.best_epoch if restored else state.epoch
    row = dict(next((r for r in state.history if r["epoch"] == epoch), {"epoch": epoch}))
    if val_batches is not None:
        after = val_metrics(*predict_logits(final, val_batches, augment, rt))
        info["val_before"] = {k: row[k] for k in after if k in row}
        info["val_after"] = after
        before = info["val_before"].get(cfg.monitor)
        # auto is a repair, not a gamble: with few images per BN layer (ResNet-18's 1x1 maps at 32 px,
        # a few hundred images) the re-estimate can validate far worse (0.50 -> 0.06 measured); then the
        # statistics the run trained with stay. `always` keeps the re-estimate whatever val says.
        worse = before is not None and (not math.isfinite(after[cfg.monitor]) or _improved(cfg, before, after[cfg.monitor]))
        if cfg.bn_recalibrate == "auto" and worse:
            final.load_state_dict(trained, strict=False)
            info["kept"] = False
        else:
            row |= after
    info["seconds"] = round(time.perf_counter() - t0, 3)
    if not info["kept"]:
        _log(f"{desc}BatchNorm statistics re-estimated on {n} un-augmented training images validated worse "
             f"({cfg.monitor} {before:.4f} -> {after[cfg.monitor]:.4f}): kept the statistics of training "
             f"(train.bn_recalibrate=always keeps the re-estimate)")
        return info, row, []
    same = state.best_epoch == state.epoch                    # best and last hold the same weights
    tags = [t for t, ok in (("best", restored or same), ("last", not restored or same)) if ok]
    change = (f": val_acc {info['val_before'].get('val_acc', float('nan')):.4f} -> {info['val_after']['val_acc']:.4f}"
              if "val_after" in info else "")
    _log(f"{desc}BatchNorm statistics recalibrated on {n} un-augmented training images "
         f"({info['seconds']:.1f}s, train.bn_recalibrate={cfg.bn_recalibrate}){change}")
    return info, {**row, "bn_recalibrated_images": n}, tags


def _is_bn_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _finite(row: dict) -> bool:
    return all(math.isfinite(row[k]) for k in ("train_loss", "val_loss") if k in row)


def _weights_finite(model: nn.Module) -> bool:
    # finite losses can hide overflowed BN running variances (inf) that the next epoch turns into nan
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


class DivergedError(RuntimeError):
    """Training produced inf/nan and no earlier epoch's weights are there to fall back on."""


def _diverged(row: dict, weights_ok: bool, cfg: TrainConfig, state: FitState, have_best: bool, desc: str) -> None:
    what = (f"{desc}training diverged in epoch {row['epoch']} (train loss {row['train_loss']:.4g}, "
            f"val loss {row.get('val_loss', float('nan')):.4g}"
            f"{'' if weights_ok else ', inf/nan in the weights or BN statistics'})")
    advice = "lower optim.lr (`resforge lr-find` suggests one), or set optim.clip_grad (e.g. 1.0)"
    if not have_best:
        raise DivergedError(f"{what}, and there is no earlier validated epoch to restore: {advice}")
    if not cfg.restore_best:
        raise DivergedError(f"{what}; train.restore_best=false asks for the final weights, and they are not "
                            f"finite: {advice} (or set train.restore_best=true to keep the best epoch)")
    _log(f"{what}: stopped; the best epoch ({state.best_epoch}) is restored. Next time {advice}")


def _report_epoch(row: dict, stats: dict, cfg: TrainConfig, desc: str) -> None:
    parts = [f"{desc}epoch {row['epoch']}/{cfg.epochs}", f"loss {row['train_loss']:.4f}",
             f"acc {row['train_acc']:.4f}"]
    if "val_acc" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_acc']:.4f}"]
    parts.append(f"{stats['images'] / max(stats['seconds'], 1e-9):.0f} img/s")
    _log("  ".join(parts))


def _log(msg: str) -> None:
    if is_main_process():
        tqdm.write(msg)


def _out_of_time(budget: float | None, elapsed: float, epochs_done: int) -> bool:
    """Stop when another epoch would end further past the budget than stopping now falls short
    of it (so the run ends at the epoch boundary nearest to the budget)."""
    return budget is not None and elapsed + 0.5 * elapsed / max(epochs_done, 1) > budget


def _snapshot(state: FitState, model, opt, sched, ema, scaler, best_weights, lookahead=None) -> dict:
    """Resume state: tensors and plain containers only (loadable with weights_only=True)."""
    return {"fit_state": {k: v for k, v in state.__dict__.items()},
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "lookahead": lookahead.state_dict() if lookahead is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_weights": best_weights,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def _restore(snap: dict, model, opt, sched, ema, scaler, lookahead=None) -> tuple[FitState, dict | None]:
    model.load_state_dict(snap["model"])
    opt.load_state_dict(snap["optimizer"])
    sched.load_state_dict(snap["scheduler"])
    if ema is not None and snap.get("ema") is not None:
        ema.load_state_dict(snap["ema"])
    if lookahead is not None and snap.get("lookahead") is not None:
        lookahead.load_state_dict(snap["lookahead"])
    if scaler is not None and snap.get("scaler") is not None:
        scaler.load_state_dict(snap["scaler"])
    torch.set_rng_state(snap["rng"]["torch"])
    if snap["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["rng"]["cuda"])
    st = FitState(**snap["fit_state"])
    return st, snap.get("best_weights")


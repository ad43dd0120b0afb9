"""Where a run's training time goes, from the PyTorch profiler on a few real training steps.

The steps are resforge's own (train_one_epoch over the run's batches, Augmenter, Updater,
predict_logits for evaluation); thin wrappers only label their phases for the profiler:

    data          taking a batch from the run's batches (index_select of the uint8 split, or a
                  streaming loader's decode)
    augmentation  Augmenter: normalise, flip, translate, cutout, mixup ... on the device
    compute       the tensor ops of forward, loss and backward (convolutions, BN, ReLU, their
                  gradients): what the bare floor also pays
    optimiser     Updater.step: the optimiser, schedule, clipping, lookahead, EMA
    evaluation    the run's in-training evaluations (validation, train-eval), per image timed
                  on its eval batches and scaled to the images the run evaluates
    other         the rest of the wall time: Python between the ops inside forward/backward
                  (module calls, autograd bookkeeping), the loop's accumulators and progress

Per-step times are scaled to the run (steps x per-step phase + eval images x per-image
evaluation), so the fractions describe the whole training time and sum to 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from resforge.training.loop import Updater, predict_logits, train_one_epoch
from resforge.bench.steps import FirstBatches, PipelineStep

CATEGORIES = ("data", "augmentation", "compute", "optimiser", "evaluation", "other")
_TAG = "resforge.bench/"
_COMPUTE_LABELS = ("forward", "loss", "backward")      # their ops are compute, their gaps "other"


class _LabelledBatches(FirstBatches):
    def batches(self, g=None):
        it = super().batches(g)
        while True:
            with record_function(_TAG + "data"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch


class _LabelledAugmenter:
    """The run's Augmenter with its training call labelled (eval views pass through)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        with record_function(_TAG + "augmentation"):
            return self.inner(*args, **kwargs)


class _LabelledUpdater(Updater):
    def backward(self, loss):
        with record_function(_TAG + "backward"):
            super().backward(loss)

    def step(self, model, state):
        with record_function(_TAG + "optimiser"):
            super().step(model, state)


def _label_forward(model):
    """Forward hooks that open and close a 'forward' range around every call of the model."""
    open_ranges = []

    def pre(module, args):
        rf = record_function(_TAG + "forward")
        rf.__enter__()
        open_ranges.append(rf)

    def post(module, args, out):
        open_ranges.pop().__exit__(None, None, None)
    return [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]


def _labelled_loss(loss_fn):
    def loss(logits, target):
        with record_function(_TAG + "loss"):
            return loss_fn(logits, target)
    return loss


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs a line when it starts and
    one when it stops (KINETO_LOG_LEVEL silences them only if set before the process starts)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _totals(events) -> tuple[dict[str, float], float]:
    """Seconds per label over the outermost labelled ranges, and the seconds inside
    forward/loss/backward ranges not covered by a direct child op (Python between ops)."""
    totals, gaps = {}, 0.0
    for e in events:
        if not e.name.startswith(_TAG):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(_TAG):
            parent = parent.cpu_parent
        if parent is not None:                 # nested in another label: counted there
            continue
        label, span = e.name[len(_TAG):], (e.time_range.end - e.time_range.start) / 1e6
        totals[label] = totals.get(label, 0.0) + span
        if label in _COMPUTE_LABELS:
            ops = sum((c.time_range.end - c.time_range.start) / 1e6 for c in e.cpu_children)
            gaps += max(0.0, span - ops)
    return totals, gaps


def profile_steps(step: PipelineStep, steps: int, eval_batches=None, eval_batch_count: int = 1) -> dict:
    """Profile `steps` real training steps (after one unprofiled warm-up step) and, if given,
    `eval_batch_count` batches of evaluation. -> {"step_seconds": {category: seconds per step},
    "eval_seconds_per_image", "steps", "eval_images", "wall_seconds"}"""
    step.run(1)                                 # kernels built, caches warm: not profiled
    u = step.updater
    updater = _LabelledUpdater(**{f.name: getattr(u, f.name) for f in dataclasses.fields(u)})
    hooks = _label_forward(step.model)
    prof = profile(activities=[ProfilerActivity.CPU])
    try:
        with _quiet_stderr():
            prof.start()
        t0 = time.perf_counter()
        train_one_epoch(step.model, _LabelledBatches(step.batches, steps), _LabelledAugmenter(step.augment),
                        updater, step.rt, _labelled_loss(step.loss), epoch=step.epoch, seed=step.cfg.train.seed,
                        state=step.state, progress=False, accumulate=step.cfg.train.accumulate)
        wall = time.perf_counter() - t0
        eval_images = 0
        if eval_batches is not None:
            first = FirstBatches(eval_batches, eval_batch_count)
            with record_function(_TAG + "evaluation"):
                predict_logits(step.model, first, step.augment, step.rt, desc="bench: evaluation")
            eval_images = first.num_images
    finally:
        with _quiet_stderr():
            prof.stop()
        for h in hooks:
            h.remove()
    step.epoch += 1
    totals, gaps = _totals(prof.events())
    n = len(FirstBatches(step.batches, steps))
    labelled = sum(v for k, v in totals.items() if k != "evaluation")
    per_step = {"data": totals.get("data", 0.0), "augmentation": totals.get("augmentation", 0.0),
                "compute": sum(totals.get(k, 0.0) for k in _COMPUTE_LABELS) - gaps,
                "optimiser": totals.get("optimiser", 0.0),
                "other": gaps + max(0.0, wall - labelled)}
    return {"step_seconds": {k: v / n for k, v in per_step.items()}, "steps": n, "wall_seconds": wall,
            "eval_seconds_per_image": totals.get("evaluation", 0.0) / eval_images if eval_images else 0.0,
            "eval_images": eval_images}


def run_fractions(profiled: dict, run_steps: float, run_eval_images: float) -> dict:
    """Profiled per-step and per-eval-image seconds scaled to a run of run_steps optimiser steps
    and run_eval_images in-training evaluation images. -> {"seconds": {category: s},
    "fractions": {category: share, summing to 1}, "projected_seconds"}"""
    seconds = {k: v * run_steps for k, v in profiled["step_seconds"].items()}
    seconds["evaluation"] = profiled["eval_seconds_per_image"] * run_eval_images
    seconds = {k: seconds.get(k, 0.0) for k in CATEGORIES}
    total = sum(seconds.values())
    fractions = {k: (v / total if total > 0 else 0.0) for k, v in seconds.items()}
    return {"seconds": seconds, "fractions": fractions, "projected_seconds": total}

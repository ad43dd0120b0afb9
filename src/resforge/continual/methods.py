"""Continual-learning methods as pieces of the one training loop (training/loop.py `fit`):
a batch source (the new data, or the new data with replayed images appended to every batch)
and a per-step loss (`fit(..., batch_loss=...)`). Nothing here trains on its own.

    naive   cross-entropy on the new data only: the baseline that forgets
    replay  experience replay (ER): every step's batch is B new images + B images drawn from the
            replay buffer, cross-entropy on all of them
    lwf     Learning without Forgetting (Li & Hoiem 2016): cross-entropy on the new data plus
            lambda * T^2 * KL(teacher || student) over the old classes' logits at temperature T,
            the teacher being the frozen previous version on the same augmented inputs
    derpp   DER++ (Buzzega et al. 2020): cross-entropy on the new images + alpha * MSE between the
            logits of replayed images and the logits stored with them + beta * cross-entropy on
            the replayed images' labels. One replayed batch serves both terms (the paper draws two;
            the expectation is the same). Defaults alpha 0.2, beta 0.5: the paper's choices for
            Split CIFAR-10 are alpha 0.1-0.2, beta 0.5 for buffers of 200-500
Weight aligning (Zhao et al. 2020) after training: head.align_weights, with any method.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("naive", "replay", "lwf", "derpp")
USES_BUFFER = {"naive": False, "replay": True, "lwf": False, "derpp": True}


class ReplayBatches:
    """The new data's training batches with `per_step` buffer images appended to each one.

    Rows of a batch: the new images first, then the replayed ones; a replayed row's index is
    base.num_images + its position in the buffer, so a loss can tell the rows apart (is_replayed)
    and find the stored logits. Drawn with the epoch's generator: reruns draw the same."""

    def __init__(self, base, buffer: dict[str, torch.Tensor], per_step: int):
        self.base, self.buf = base, buffer
        self.per_step = min(per_step, len(buffer["labels"]))
        self.offset = base.num_images

    def __len__(self) -> int:
        return len(self.base)

    @property
    def num_images(self) -> int:
        return self.base.num_images

    def batches(self, g: torch.Generator | None = None):
        n = len(self.buf["labels"])
        dev = self.buf["labels"].device
        for x, y, idx in self.base.batches(g):
            if self.per_step == 0:
                yield x, y, idx
                continue
            j = torch.randint(0, n, (self.per_step,), generator=g, device=dev) if g is not None \
                else torch.arange(self.per_step, device=dev)
            yield (torch.cat([x, self.buf["images"].index_select(0, j).to(x.device)]),
                   torch.cat([y, self.buf["labels"].index_select(0, j).to(y.device)]),
                   torch.cat([idx.to(dev), j + self.offset]).to(idx.device))


def is_replayed(idx: torch.Tensor, offset: int) -> torch.Tensor:
    return idx >= offset


def naive_loss(ce: Callable) -> Callable:
    return lambda logits, target, x, batch: ce(logits, target)


def lwf_loss(ce: Callable, teacher: nn.Module, n_old: int, rt, temperature: float = 2.0,
             weight: float = 1.0) -> Callable:
    """CE + weight * T^2 * KL(softmax(t/T) || softmax(s/T)) on the first n_old logits."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    T = temperature

    def loss(logits, target, x, batch):
        with torch.no_grad(), rt.autocast():
            t = teacher(rt.to_input(x)).float()[:, :n_old]
        s = logits.float()[:, :n_old]
        kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean")
        return ce(logits, target) + weight * T * T * kd
    return loss


def derpp_loss(ce: Callable, buffer: dict[str, torch.Tensor], offset: int, alpha: float = 0.2,
               beta: float = 0.5) -> Callable:
    """CE(new rows) + alpha * MSE(replayed logits, stored logits; the columns each stored row
    had) + beta * CE(replayed rows, their labels)."""
    def loss(logits, target, x, batch):
        idx = batch[2].to(logits.device)
        rep = is_replayed(idx, offset)
        out = ce(logits[~rep], target[~rep])
        if rep.any():
            j = (idx[rep] - offset).to(buffer["logits"].device)
            stored = buffer["logits"].index_select(0, j).to(logits.device)
            k = buffer["logit_k"].index_select(0, j).to(logits.device)
            z = logits[rep].float()
            mask = (torch.arange(z.shape[1], device=z.device)[None] < k[:, None]).float()
            mse = ((z - stored[:, :z.shape[1]]) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)
            out = out + alpha * mse + beta * ce(logits[rep], target[rep])
        return out
    return loss


def replay_loss(ce: Callable) -> Callable:
    """ER: cross-entropy over the whole mixed batch (new and replayed rows alike)."""
    return naive_loss(ce)

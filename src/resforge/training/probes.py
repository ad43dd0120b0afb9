"""Optional measurements the training loop can take besides loss and accuracy.

- GradNormMeter: per-stage gradient L2 norms, averaged over an epoch's steps
  (`train.grad_norms`): makes the optimisation difficulty of deep plain nets visible.
- train_eval_batches: a fixed, un-augmented subset of the training split (`train.eval_train`),
  re-evaluated in eval mode each epoch.  The loop's `train_acc` is measured on augmented
  batches while the weights move (and BN uses batch statistics), so it is not the training
  error of any one model; He et al.'s Fig. 6 curves need the latter.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resforge.data.loader import make_batches
from resforge.data.splits import take


def stage_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{stage: trainable parameters} in `model.stage_names` order (the stages partition the
    parameters); models without stages fall back to their top-level children."""
    names = getattr(model, "stage_names", None)
    if names and hasattr(model, "get_stage"):
        stages = {n: model.get_stage(n) for n in names}
    else:
        stages = dict(model.named_children())
    out = {n: [p for p in m.parameters() if p.requires_grad] for n, m in stages.items()}
    return {n: ps for n, ps in out.items() if ps}


class GradNormMeter:
    """Sums each stage's gradient norm ||g_stage||_2 over steps, on the device (no host sync per
    step); `epoch_means()` returns {"grad_norm_<stage>": mean over the steps} and resets."""

    def __init__(self, model: nn.Module):
        self.stages = stage_params(model)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def update(self) -> None:
        """Call after backward (and after unscaling an fp16 loss), before any clipping."""
        for name, params in self.stages.items():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            # ||g_stage|| = || (||g_p||)_p ||: one foreach kernel, then a tiny vector norm
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            self.sums[name] = self.sums.get(name, 0) + norm.detach()
        self.steps += 1

    def epoch_means(self) -> dict[str, float]:
        out = {f"grad_norm_{n}": (s / max(self.steps, 1)).item() for n, s in self.sums.items()}
        self.reset()
        return out


def fixed_subset_index(labels: np.ndarray, n: int) -> np.ndarray:
    """n indices spread evenly over the split (deterministic, same every epoch and run);
    shuffled splits make that close to a stratified sample."""
    n = min(n, len(labels))
    return np.linspace(0, len(labels) - 1, num=n).round().astype(np.int64)


def train_eval_batches(bundle, n: int, device: torch.device, batch_size: int, workers: int = 2):
    """Eval-order batches over a fixed subset of the training split (None when n == 0);
    works for in-memory and streamed splits alike."""
    if n <= 0:
        return None
    sp = bundle.splits["train"]
    sub = dataclasses.replace(bundle, splits={"train": take(sp, fixed_subset_index(sp.labels, n))})
    return make_batches(sub, "train", device, batch_size, train=False, workers=workers)


def prefixed_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict:
    """{prefix_loss, prefix_acc} of logits (N, K) against labels (N,)."""
    return {f"{prefix}_loss": F.cross_entropy(logits, labels).item(),
            f"{prefix}_acc": (logits.argmax(1) == labels).float().mean().item()}

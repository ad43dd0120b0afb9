"""Lookahead with a ramped pull (hlb-cifar10 / airbench94's "EMA every 5 steps").

A slow copy of the weights (and of the float buffers: BN running statistics) follows the
fast, optimised ones.  Every `every` optimiser steps

    slow <- decay * slow + (1 - decay) * fast,   fast <- slow,     decay = alpha * (step / total)^3

so early in training (decay ~ 0) it does nothing, and towards the end the fast weights are
pulled back to an average of their recent past, which damps the noise of the large final
steps.  At the end `finish` copies the slow weights into the model.  Unlike `EMA`, the model
itself is modified: what is evaluated and saved is the lookahead model.
"""
from __future__ import annotations

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)          # torch.compile wrapper -> the module


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> live tensor for every floating-point parameter and buffer (not counters)."""
    return {k: v for k, v in _unwrap(model).state_dict(keep_vars=True).items() if v.is_floating_point()}


class Lookahead:
    def __init__(self, model: nn.Module, every: int = 5, alpha: float = 0.95 ** 5, total_steps: int = 1):
        if every < 1:
            raise ValueError(f"lookahead every={every}: must be at least 1")
        if not 0 <= alpha <= 1:
            raise ValueError(f"lookahead alpha={alpha}: must be in [0, 1]")
        self.every, self.alpha, self.total = every, alpha, max(total_steps, 1)
        self.slow = {k: v.detach().clone() for k, v in _float_state(model).items()}
        self.steps = 0                                   # optimiser steps seen through `attach`

    def attach(self, opt: torch.optim.Optimizer, model: nn.Module):
        """Run `update` after every `opt.step()` (a step hook: the training loop needs no
        change); returns the hook handle (`.remove()` detaches)."""
        def hook(optimizer, args, kwargs):
            self.steps += 1
            self.update(model, self.steps)
        return opt.register_step_post_hook(hook)

    def decay(self, step: int) -> float:
        return self.alpha * (min(step, self.total) / self.total) ** 3

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimiser step number `step` (1-based)."""
        if step % self.every:
            return
        self._sync(model, self.decay(step))

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """End of training: the model takes the slow weights (decay 1 keeps them as they are)."""
        self._sync(model, 1.0)

    def _sync(self, model: nn.Module, decay: float) -> None:
        for name, fast in _float_state(model).items():
            slow = self.slow[name]
            slow.lerp_(fast.detach().to(slow.dtype), 1 - decay)
            fast.data.copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": dict(self.slow), "steps": self.steps, "every": self.every, "alpha": self.alpha,
                "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for name, value in state["slow"].items():
            self.slow[name].copy_(value)

"""Exponential moving average of weights (Polyak averaging), kept in fp32 beside the model."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, every `every` optimiser steps.

    The decay is warmed up as min(decay, (1 + n) / (10 + n)) so early averages are not
    dominated by the random initialisation.  BN buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.999, every: int = 1):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.every, self.updates = decay, every, 0
        self._params = {n for n, _ in self.module.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        self.updates += 1
        model = getattr(model, "_orig_mod", model)   # torch.compile wrapper: its keys are prefixed
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if name in self._params:
                target.lerp_(value.detach(), 1 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])

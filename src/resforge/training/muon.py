"""Muon for the hidden filters, a companion optimiser for everything else, as one optimiser.

Muon (Jordan et al. 2024) replaces a weight matrix's momentum M by the nearest semi-orthogonal
matrix, M = U S V^T -> ~U V^T, computed by a few Newton-Schulz iterations, so every direction
of the update moves at the same rate however unevenly the gradient spreads over them.  It is
meant for the hidden layers' matrices; the stem, the classifier head and every 1-D parameter
(BN, biases) stay on the companion (SGD-Nesterov by default) with their usual rates and hints.

We use torch.optim.Muon itself.  It accepts 2-D parameters only, so a conv filter
(out, in, kh, kw) is handed to it as a (out, in*kh*kw) *view* of the same storage: Muon's
in-place updates are the filter's.  The columns follow the filter's memory order (kh, kw, in
for channels_last), a column permutation, which leaves the singular values and so the
orthogonalised update unchanged.  torch's Newton-Schulz runs in bfloat16 on every device:
emulated (slow) on CPUs without native bf16; its FLOPs are counted by `flops_per_step`.

What the rest of the training loop sees is one torch.optim.Optimizer whose param_groups hold
the real parameters: LambdaLR scales every group's lr, gradient clipping, GradScaler, lookahead's
step hook and zero_grad work on them; each step copies the groups' lr / weight_decay / momentum
into the two inner optimisers, and state_dict() holds both inner states, so resume is exact.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

_INNER_KEYS = ("lr", "weight_decay", "momentum", "nesterov")     # outer group -> inner group each step
_MUON_EPS = 1e-7                                                  # torch.optim.Muon's default eps


def matrix_view(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 2-D (rows = dim 0) view sharing p's storage, and the dim order it flattens.

    The trailing dims are taken in memory order (largest stride first), so contiguous and
    channels_last filters both flatten without a copy."""
    order = (0, *sorted(range(1, p.ndim), key=lambda d: -p.stride(d)))
    permuted = p.detach().permute(order)
    if not permuted.is_contiguous():
        raise ValueError(f"a filter of shape {tuple(p.shape)} with strides {p.stride()} has no 2-D view: "
                         "Muon needs contiguous or channels_last weights")
    return permuted.view(p.shape[0], -1), order


def newton_schulz_flops(rows: int, cols: int, steps: int) -> float:
    """FLOPs of torch's quintic Newton-Schulz on a rows x cols matrix (2 per multiply-add).
    On X (m x n, m <= n) each step is A = X X^T (2m^2 n), B = bA + cA^2 (2m^3), X = aX + BX (2m^2 n)."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m ** 3)


class MuonWithCompanion(torch.optim.Optimizer):
    """groups: dicts with "params", "lr", "weight_decay", and "muon": True for the filters (each
    with "momentum", "nesterov").  companion(groups) builds the optimiser of the other groups.
    ns_steps: Newton-Schulz iterations.  normalize: before each step rescale every filter to
    Frobenius norm sqrt(rows) (mean squared row norm 1).  Only for filters that feed a
    normalisation layer (BN makes the network blind to their scale); then the filter never
    grows, so lr stays the step's size relative to the filter instead of decaying as the
    norm grows."""

    def __init__(self, groups: list[dict], companion: Callable[[list[dict]], torch.optim.Optimizer],
                 ns_steps: int = 5, normalize: bool = False):
        filters = [g for g in groups if g.get("muon")]
        others = [{**g, "muon": False} for g in groups if not g.get("muon")]
        if not filters:
            raise ValueError("optim.name=muon found no hidden filter to optimise (every >= 2-D weight is frozen, "
                             "the stem or the head): use optim.name=sgd")
        super().__init__(filters + others, defaults={})
        self.ns_steps, self.normalize = ns_steps, normalize
        self._views = [(p, *matrix_view(p)) for g in filters for p in g["params"]]   # (param, flat, order)
        flat = iter(v for _, v, _ in self._views)
        self.muon = torch.optim.Muon([{"params": [next(flat) for _ in g["params"]], **_inner(g)} for g in filters],
                                     ns_steps=ns_steps, adjust_lr_fn="original")
        self.companion = companion([{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                                    for g in others]) if others else None

    def flops_per_step(self) -> float:
        """Newton-Schulz FLOPs of one step over all filters (the rest of the update is element-wise)."""
        return sum(newton_schulz_flops(*flat.shape, self.ns_steps) for _, flat, _ in self._views)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_groups()
        self._check_views()
        for p, flat, order in self._views:
            flat.grad = None if p.grad is None else p.grad.permute(order).reshape(flat.shape)
            if self.normalize and p.grad is not None:
                flat.mul_(math.sqrt(flat.shape[0]) / flat.norm().clamp(min=_MUON_EPS))
        self.muon.step()
        if self.companion is not None:
            self.companion.step()
        for _, flat, _ in self._views:
            flat.grad = None
        return loss

    def _sync_groups(self) -> None:
        """The scheduler (and anyone else) sets the outer groups' rates; the inner ones follow."""
        outer = iter(self.param_groups)
        for inner in self.muon.param_groups:
            inner.update(_inner(next(outer)))
        for inner in self.companion.param_groups if self.companion is not None else ():
            g = next(outer)
            inner["lr"], inner["weight_decay"] = g["lr"], g["weight_decay"]

    def _check_views(self) -> None:
        """A parameter whose storage was replaced (p.data = ...) no longer moves with its view."""
        for p, flat, _ in self._views:
            if flat.data_ptr() != p.data_ptr():
                raise RuntimeError(f"a Muon filter of shape {tuple(p.shape)} was given new storage after the optimiser "
                                   "was built: build the optimiser after moving the model (device, memory format)")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["muon"] = self.muon.state_dict()
        sd["companion"] = self.companion.state_dict() if self.companion is not None else None
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "muon" not in state_dict:
            raise ValueError("the saved optimiser state is not a Muon one (optim.name=muon): resume with the "
                             "optimiser the run was started with")
        super().load_state_dict({k: state_dict[k] for k in ("state", "param_groups")})
        self.muon.load_state_dict(state_dict["muon"])
        if self.companion is not None:
            self.companion.load_state_dict(state_dict["companion"])


def _inner(group: dict) -> dict:
    return {k: group[k] for k in _INNER_KEYS}

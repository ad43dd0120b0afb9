"""The machine's sustained FLOP rate: square matmuls, and a model's own convolution layers.

Every rate here is FLOP/s with one multiply-add = 2 FLOPs (resforge.flops' convention), timed
on the threads the calling process has set (make_runtime applied them as a run would). Each
measurement runs one untimed call first (oneDNN builds its kernels on the first call of a
shape), then calls back to back for `seconds` of wall time: a sustained rate, not one lucky
call (matmuls: the fastest of three windows, each still many calls). A call that takes longer
than its time is still timed once.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from resforge.flops import count_flops
from resforge.training.device import Runtime

MATMUL_SIZES = (256, 512, 1024, 2048)     # square n x n @ n x n; 2 n^3 FLOPs per call


def sustained_seconds(fn, seconds: float, sync=lambda: None, windows: int = 1) -> float:
    """Wall seconds of one fn() call: one untimed warm-up call, then calls for >= `seconds`,
    cut into `windows` equal windows; the mean of the fastest window (several windows: a burst
    of other work on a shared CPU spoils one window, not the measurement). sync() waits for
    queued device work (a GPU runs fn asynchronously)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(max(1, windows)):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            sync()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / max(1, windows):
                break
        best = min(best, elapsed / calls)
    return best


def _syncer(rt: Runtime):
    return (lambda: torch.cuda.synchronize(rt.device)) if rt.device.type == "cuda" else (lambda: None)


def matmul_peak(rt: Runtime, seconds: float, sizes=MATMUL_SIZES) -> dict:
    """Sustained FLOP/s of square matmuls in the run's precision (fp32, or bf16 autocast where
    the runtime picked it: only where native), per size (the fastest of 3 windows of
    seconds / len(sizes) / 3 each); "flops_per_s" is the best size's.
    -> {"precision", "flops_per_s", "size", "by_size": {n: FLOP/s}}"""
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=rt.device)
        b = torch.randn(n, n, device=rt.device)

        def call():
            with rt.autocast():
                torch.mm(a, b)
        by_size[n] = 2 * n ** 3 / sustained_seconds(call, seconds / len(sizes), _syncer(rt), windows=3)
    best = max(by_size, key=by_size.get)
    return {"precision": rt.precision, "flops_per_s": by_size[best], "size": best, "by_size": by_size}


@dataclass(frozen=True)
class ConvShape:
    """One distinct convolution of a model at its input size; `count` layers share it."""
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    in_hw: tuple[int, int]           # input height, width
    input_grad: bool                 # the layer's input needs a gradient (every layer but the first)
    weight_grad: bool                # its weight is trained (airbench94's whitening stem is frozen)

    def describe(self) -> str:
        k, s = "x".join(map(str, self.kernel)), self.stride[0]
        grads = "fwd+bwd" if self.input_grad or self.weight_grad else "fwd only (frozen)"
        return f"{self.cin}->{self.cout} {k}/{s} at {self.in_hw[0]}x{self.in_hw[1]} {grads}"


def conv_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[ConvShape, int]:
    """{distinct Conv2d shape: layers of that shape} seen in one training-mode forward of a
    2-image batch at (C, H, W) (a copy of the model; the original is untouched)."""
    net = copy.deepcopy(model).float().cpu().train()
    seen: dict[ConvShape, int] = {}

    def hook(m: nn.Conv2d, args):
        x = args[0]
        key = ConvShape(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                        tuple(m.padding) if not isinstance(m.padding, str) else (-1, -1), m.groups,
                        m.bias is not None, tuple(x.shape[-2:]), x.requires_grad, m.weight.requires_grad)
        seen[key] = seen.get(key, 0) + 1

    hooks = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        net(torch.zeros(2, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return seen


class _Isolated(nn.Module):
    """One conv layer as count_flops sees it inside the model: `lift` (a trained scalar, an
    element-wise product the counter ignores) makes the input need a gradient where it does in
    the model, and `out` keeps backward defined when nothing of the layer is trained."""

    def __init__(self, conv: nn.Conv2d, input_grad: bool):
        super().__init__()
        self.conv = conv
        self.lift = nn.Parameter(torch.ones(())) if input_grad else None
        self.out = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.conv(x * self.lift if self.lift is not None else x) * self.out


def _layer(shape: ConvShape) -> nn.Conv2d:
    pad = "same" if shape.padding == (-1, -1) else shape.padding
    conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, shape.stride, pad, groups=shape.groups, bias=shape.bias)
    conv.requires_grad_(shape.weight_grad)
    return conv


def time_conv(shape: ConvShape, batch: int, rt: Runtime, seconds: float) -> dict:
    """One conv shape alone at the run's batch size, layout and precision: forward, and the
    backward products the model needs (input and/or weight gradient). -> {"flops" per batch,
    "seconds" per batch, "flops_per_s"}"""
    conv = _layer(shape)
    flops = count_flops(_Isolated(conv, shape.input_grad), (shape.cin, *shape.in_hw))["train"] * batch
    conv = conv.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    x = rt.to_input(torch.randn(batch, shape.cin, *shape.in_hw, device=rt.device)).requires_grad_(shape.input_grad)
    backward = shape.input_grad or shape.weight_grad

    def call():
        with rt.autocast():
            y = conv(x)
        if backward:
            y.backward(torch.ones_like(y))    # the gradient's values do not change the work
            x.grad = None
            conv.zero_grad(set_to_none=True)
    s = sustained_seconds(call, seconds, _syncer(rt))
    return {"flops": flops, "seconds": s, "flops_per_s": flops / s}


def conv_rates(model: nn.Module, input_shape: tuple[int, int, int], batch: int, rt: Runtime,
               seconds: float) -> dict:
    """Every distinct conv of the model timed alone (time_conv), `seconds` shared among them.
    -> {"shapes": [per shape: its
    fields, count, flops, seconds, flops_per_s], "flops_per_s": all the model's conv FLOPs of one
    training batch / the seconds those layers took alone, "seconds_per_image": the same per image}"""
    shapes, rows = conv_shapes(model, input_shape), []
    for shape, count in shapes.items():
        rows.append({**asdict(shape), "describe": shape.describe(), "count": count,
                     **time_conv(shape, batch, rt, seconds / len(shapes))})
    flops = sum(r["flops"] * r["count"] for r in rows)
    secs = sum(r["seconds"] * r["count"] for r in rows)
    return {"shapes": rows, "flops_per_s": flops / secs if secs else 0.0,
            "seconds_per_image": secs / batch}

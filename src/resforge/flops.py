"""FLOPs of a network on its real input size, counted by PyTorch's FlopCounterMode.

One multiply-add is 2 FLOPs (the convention of airbench's 0.36e15 and of published FLOP counts).
The counter sees the matrix products only (convolutions and their backward, mm/addmm/bmm); the
element-wise work of BatchNorm, ReLU, pooling and the optimiser is memory traffic, not counted,
as in every published count we compare against.

    forward   one image through the network in training mode
    backward  the gradients of that forward: for a convolution, one product for the input's
              gradient and one for the weight's (the first layer has no input gradient), so
              backward is a little under 2x forward
    train     forward + backward: the FLOPs one training image costs per epoch
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_shape: tuple[int, int, int], *, batch: int = 2) -> dict[str, float]:
    """{"forward", "backward", "train", "inference"} FLOPs per image of `model` at (C, H, W).

    Measured on a float32 CPU copy (the original's weights, buffers and gradients are untouched);
    `batch` is 2 because training-mode BatchNorm needs more than one value per channel, and the
    counts are divided by it (every counted product is linear in the batch)."""
    net = copy.deepcopy(model).float().cpu()
    for p in net.parameters():
        p.grad = None
    x = torch.zeros(batch, *input_shape)
    net.train()
    with FlopCounterMode(display=False) as fwd:
        out = net(x)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    with FlopCounterMode(display=False) as bwd:
        logits.float().sum().backward()
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as inf:
        net(x)
    f, b, i = (m.get_total_flops() / batch for m in (fwd, bwd, inf))
    return {"forward": f, "backward": b, "train": f + b, "inference": i}


def training_flops(per_image: dict[str, float], images_seen: int, eval_images: int = 0) -> float:
    """Total FLOPs of a run: every training image's forward+backward, plus evaluation forwards
    (validation and train-eval passes) when their image count is given."""
    return per_image["train"] * images_seen + per_image["inference"] * eval_images

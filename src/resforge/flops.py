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
    for p in net.parameters():                 # every weight's gradient: what training from scratch computes
        p.grad = None                          # (an EMA copy or a frozen layer would otherwise drop out)
        p.requires_grad_(True)
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


def compute_record(model: nn.Module, input_size, *, images_seen: int, eval_images: int,
                   pass_seconds: float, wall_seconds: float) -> dict:
    """report.json's "compute": FLOPs per image at the run's input size, the run's totals, and the
    FLOP/s its training passes achieved (training FLOPs / seconds in training passes; evaluation
    and checkpoints are in wall_seconds, not in that rate)."""
    per = count_flops(model, tuple(int(v) for v in input_size))
    train = per["train"] * images_seen
    return {"input_size": [int(v) for v in input_size],
            "flops_per_train_image": per["train"], "flops_per_eval_image": per["inference"],
            "train_images_seen": int(images_seen), "eval_images": int(eval_images),
            "train_flops": train, "eval_flops": per["inference"] * eval_images,
            "train_seconds": round(pass_seconds, 2), "wall_seconds": round(wall_seconds, 2),
            "achieved_flops_per_s": train / pass_seconds if pass_seconds > 0 else None,
            "counter": "torch.utils.flop_counter: matrix products only, 2 FLOPs per multiply-add"}


def describe(record: dict) -> str:
    """One line for the end of a run."""
    rate = record.get("achieved_flops_per_s")
    return (f"compute: {record['flops_per_train_image'] / 1e6:.1f} MFLOPs per training image x "
            f"{record['train_images_seen']:,} images = {record['train_flops']:.3g} training FLOPs"
            + (f", {rate / 1e9:.1f} GFLOP/s achieved in the training passes" if rate else ""))


def run_flops(model: nn.Module, channels: int, sizes: list[tuple[int, int]], images_per_epoch: int,
              steps: int = 0, optimizer_flops_per_step: float = 0.0) -> dict:
    """What a fit cost: sizes[e] is epoch e's training image size (progressive resizing varies
    it), each epoch sees images_per_epoch images; the optimiser's own products (Muon's
    Newton-Schulz) add optimizer_flops_per_step per step.  -> {"train" (total), "network",
    "optimizer", "per_image_train" {"HxW": FLOPs}, "epochs_at" {"HxW": epochs}}."""
    per_size = {hw: count_flops(model, (channels, *hw))["train"] for hw in sorted(set(sizes))}
    network = sum(per_size[hw] * images_per_epoch for hw in sizes)
    optimizer = optimizer_flops_per_step * steps
    name = lambda hw: f"{hw[0]}x{hw[1]}"                    # noqa: E731
    return {"train": network + optimizer, "network": network, "optimizer": optimizer,
            "per_image_train": {name(hw): f for hw, f in per_size.items()},
            "epochs_at": {name(hw): sizes.count(hw) for hw in per_size}}

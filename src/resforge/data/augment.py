"""Batch-wide augmentation on the training device: one tensor op per batch, no per-image Python.

All functions take x as (B, C, H, W) float in [0, 1] (or already normalised; the geometric
ops don't care) and an explicit torch.Generator on x's device, so a run's augmentation is a
pure function of (seed, epoch, batch) and a resumed run repeats it exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from resforge.config import AugConfig


def _rand(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device)


def random_translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` and take a random HxW crop per image (He et al.'s 4-px pad + crop).
    Implemented as one gather: rows (B, H) and cols (B, W) index the padded batch."""
    if pad <= 0:
        return x
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=g, device=x.device)
    rows = dy[:, None] + torch.arange(H, device=x.device)          # (B, H)
    cols = dx[:, None] + torch.arange(W, device=x.device)          # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = xp[b, :, rows[:, :, None], cols[:, None, :]]             # (B, H, W, C)
    return out.permute(0, 3, 1, 2)                                  # channels_last view


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images where mask (B,) is True."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def alternating_flip_mask(index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """airbench's alternating flip: each image gets a fixed random coin from its dataset index;
    even epochs use the coin, odd epochs its opposite, so over two epochs every image is seen
    exactly once in each orientation (less redundancy than independent random flips)."""
    coin = ((index * 2654435761 + seed * 40503) >> 7) & 1             # cheap integer hash
    return (coin == 1) ^ bool(epoch % 2)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero a size x size square at a random centre per image (DeVries & Taylor 2017)."""
    if size <= 0:
        return x
    B, _, H, W = x.shape
    cy = (_rand(B, g, x.device) * H).long()[:, None, None]
    cx = (_rand(B, g, x.device) * W).long()[:, None, None]
    r = torch.arange(H, device=x.device)[None, :, None]
    c = torch.arange(W, device=x.device)[None, None, :]
    hole = ((r - cy).abs() <= size // 2) & ((c - cx).abs() <= size // 2)   # (B, H, W)
    return x * (~hole)[:, None].to(x.dtype)


def random_resized_crop(x: torch.Tensor, out_hw: tuple[int, int], g: torch.Generator,
                        scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop of random area fraction and aspect ratio, resampled to out_hw
    with one batched affine_grid + grid_sample (bilinear)."""
    B = x.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * _rand(B, g, x.device)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(B, g, x.device)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)          # crop width as fraction of W
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (1 - w) * (2 * _rand(B, g, x.device) - 1)                  # centre in [-1, 1] coords
    cy = (1 - h) * (2 * _rand(B, g, x.device) - 1)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, (B, x.shape[1], *out_hw), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _beta(alpha: float, g: torch.Generator) -> float:
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, g: torch.Generator,
        mixup: float = 0.0, cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (blend) or CutMix (paste a box) with a shuffled copy of the batch.
    Returns soft targets (B, K); when both are on, each batch picks one at random."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or _rand(1, g, x.device).item() < 0.5)
    lam = _beta(cutmix if use_cutmix else mixup, g)
    perm = torch.randperm(x.shape[0], generator=g, device=x.device)
    if use_cutmix:
        H, W = x.shape[-2:]
        ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        top = int(torch.randint(0, H - ch + 1, (1,), generator=g, device=x.device))
        left = int(torch.randint(0, W - cw + 1, (1,), generator=g, device=x.device))
        x = x.clone()
        x[:, :, top:top + ch, left:left + cw] = x[perm, :, top:top + ch, left:left + cw]
        lam = 1 - ch * cw / (H * W)                                  # the area actually kept
    else:
        x = lam * x + (1 - lam) * x[perm]
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return x, lam * onehot + (1 - lam) * onehot[perm]


def progressive_sizes(full_hw: tuple[int, int], start: int, ramp: float, epochs: int) -> list[tuple[int, int]]:
    """Training image size per epoch: the longer side grows linearly from `start` at epoch 0
    towards full over the first round(ramp * epochs) epochs (one size per epoch, the shorter
    side in proportion), then stays full.  E.g. 32 px, start 16, ramp 0.5, 4 epochs:
    16, 24, 32, 32."""
    side = max(full_hw)
    if not 1 <= start < side:
        raise ValueError(f"aug.resize_start={start} must be smaller than the images' {side} px side")
    ramp_epochs = max(1, math.floor(ramp * epochs + 0.5))       # nearest, halves up
    sizes = []
    for e in range(epochs):
        s = start + (side - start) * e / ramp_epochs if e < ramp_epochs else side
        sizes.append(tuple(max(1, round(d * s / side)) for d in full_hw))
    return sizes


def resize_batch(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The whole batch resampled to hw in one call (bilinear; antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)


class Augmenter:
    """uint8 batch (B, C, H, W) -> normalised float batch + targets, per AugConfig.
    epochs: the run's train.epochs, which progressive resizing (aug.resize_start) needs to
    place its sizes; evaluation views (eval_view, tta_views) are always at out_hw."""

    def __init__(self, cfg: AugConfig, mean, std, num_classes: int, out_hw: tuple[int, int], seed: int = 0,
                 epochs: int | None = None):
        self.cfg, self.num_classes, self.out_hw, self.seed = cfg, num_classes, tuple(out_hw), seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.sizes = None                       # training size per epoch; None: always out_hw
        if cfg.resize_start is not None:
            if epochs is None:
                raise ValueError("aug.resize_start (progressive resizing) is supported by `resforge train` only: "
                                 "set it to null here")
            self.sizes = progressive_sizes(self.out_hw, cfg.resize_start, cfg.resize_ramp, epochs)

    def train_hw(self, epoch: int) -> tuple[int, int]:
        """The size of epoch `epoch`'s training images (0-based; past the plan: full size)."""
        return self.sizes[epoch] if self.sizes is not None and epoch < len(self.sizes) else self.out_hw

    def check_model(self, model, channels: int, device) -> None:
        """Progressive resizing feeds the network smaller images than it is evaluated on: one
        forward at the smallest size (eval mode, no gradients) tells now whether it can."""
        if self.sizes is None:
            return
        hw = min(self.sizes)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, channels, *hw, device=device))
        except RuntimeError as e:
            raise ValueError(f"aug.resize_start={self.cfg.resize_start}: the network cannot take {hw[0]}x{hw[1]} "
                             f"inputs ({str(e).splitlines()[0]}); progressive resizing needs one that pools globally "
                             "and is not too deep for the size: raise aug.resize_start or set it to null") from None
        finally:
            model.train(was_training)
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise ValueError(f"aug.resize_start={self.cfg.resize_start}: at {hw[0]}x{hw[1]} the network returns "
                             f"shape {tuple(out.shape)}, not (batch, {self.num_classes}): set aug.resize_start to null")

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x_u8.device), self.std.to(x_u8.device)
        return (x_u8.float() / 255 - mean) / std

    def eval_view(self, x_u8: torch.Tensor) -> torch.Tensor:
        """What evaluation, prediction and feature extraction see: normalised, resized to out_hw."""
        x = self.normalize(x_u8)
        if x.shape[-2:] == self.out_hw:
            return x
        return F.interpolate(x, size=self.out_hw, mode="bilinear", antialias=True, align_corners=False)

    # Test-time views follow what training showed the network: a mirror only if it trained with
    # flips, one-pixel shifts only if it trained with translations (aug.translate >= 1). A mirror
    # view for a run trained without flips costs accuracy (digits: 98.89% -> 88.33%).
    def tta_views(self, x: torch.Tensor) -> list[torch.Tensor]:
        return tta_views(x, flip=self.cfg.flip != "none", shift=self.cfg.translate >= 1)

    def tta_view_names(self) -> list[str]:
        return tta_view_names(self.out_hw, flip=self.cfg.flip != "none", shift=self.cfg.translate >= 1)

    def __call__(self, x_u8: torch.Tensor, y: torch.Tensor, index: torch.Tensor, epoch: int,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        if c.random_resized_crop:
            x = random_resized_crop(self.normalize(x_u8), self.out_hw, g, scale=tuple(c.rrc_scale))
        else:
            x = self.eval_view(x_u8)
        if c.flip == "random":
            x = flip_where(x, _rand(x.shape[0], g, x.device) < 0.5)
        elif c.flip == "alternate":
            x = flip_where(x, alternating_flip_mask(index.to(x.device), epoch, self.seed))
        x = random_translate(x, c.translate, g)
        x = cutout(x, c.cutout, g)
        x = resize_batch(x, self.train_hw(epoch))          # progressive resizing; a no-op at full size
        if c.mixup > 0 or c.cutmix > 0:
            return mix(x, y, self.num_classes, g, c.mixup, c.cutmix)
        return x, y


TTA_MAX_SHIFT_SIDE = 64      # shift views only for small images, where one pixel is a real translation


def tta_views(x: torch.Tensor, flip: bool = True, shift: bool = True) -> list[torch.Tensor]:
    """Test-time views of a normalised batch: the image, its mirror when `flip`, and when `shift`
    (and the image is small, <= 64 px) both shifted by one pixel diagonally each way, zero-padded
    as random_translate pads, with their mirrors when `flip`. Order as in tta_view_names."""
    views = [x]
    if shift and max(x.shape[-2:]) <= TTA_MAX_SHIFT_SIDE:
        xp = F.pad(x, (1, 1, 1, 1))
        H, W = x.shape[-2:]
        views += [xp[..., :H, :W], xp[..., 2:, 2:]]
    return views + [v.flip(3) for v in views] if flip else views


def tta_view_names(out_hw: tuple[int, int], flip: bool = True, shift: bool = True) -> list[str]:
    names = ["identity"]
    if shift and max(out_hw) <= TTA_MAX_SHIFT_SIDE:
        names += ["shift(+1,+1)", "shift(-1,-1)"]
    return names + [f"mirror({n})" if n != "identity" else "mirror" for n in names] if flip else names

"""CIFAR-layout ResNets and their plain twins (He et al. 2016, "Deep Residual Learning", sec. 4.2).

3x3 conv (16) -> three stages of n BasicBlocks at 16/32/64 channels (32x32 -> 16x16 -> 8x8 for
CIFAR images) -> global average pool -> fc; depth = 6n + 2. Keys: conv1, bn1,
layer1..3.N.{conv1,bn1,conv2,bn2}, fc (+ layerK.0.downsample.{0,1} for shortcut "B").

Shortcuts where the shape changes:
  "A" (default, the paper's CIFAR choice): subsample by 2 and zero-pad the new channels -- no
      parameters, so resnetN and plainN have exactly the same parameter names and shapes.
  "B": 1x1 conv + BN projection.
plainN: the same layers without any shortcut (the paper's "plain" baselines).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resforge.models import register_model
from resforge.models.resnet import BasicBlock, ResNetBase, conv1x1, conv3x3, norm_stats


class ShortcutA(nn.Module):
    """Parameter-free projection (B, cin, H, W) -> (B, cout, H/stride, W/stride).

    The input channels land in the middle, (cout - cin) // 2 zero channels on each side: this
    matches the published option-A weights (akamaster), whose later layers expect that order.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = ((cout - cin) // 2, cout - cin - (cout - cin) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # pad order: W, H, then C


def make_cifar_stage(inplanes: int, planes: int, blocks: int, stride: int,
                     shortcut: str, residual: bool) -> nn.Sequential:
    """`blocks` BasicBlocks; the first one changes width/resolution (through `shortcut`)."""
    downsample = None
    if residual and (stride != 1 or inplanes != planes):
        if shortcut == "A":
            downsample = ShortcutA(inplanes, planes, stride)
        else:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample, residual=residual)]
    layers += [BasicBlock(planes, planes, residual=residual) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(ResNetBase):
    """(B, in_chans, H, W) -> (B, num_classes); features are (B, 64, H/4, W/4)."""

    def __init__(self, n: int, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 shortcut: str = "A", residual: bool = True, zero_init_residual: bool = False,
                 arch: str = "resnet"):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if not residual and shortcut != "A":
            raise ValueError("plain networks have no shortcuts: shortcut='B' does not apply")
        self.num_classes = num_classes
        self.conv1 = conv3x3(in_chans, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_cifar_stage(16, 16, n, 1, shortcut, residual)
        self.layer2 = make_cifar_stage(16, 32, n, 2, shortcut, residual)
        self.layer3 = make_cifar_stage(32, 64, n, 2, shortcut, residual)
        self.num_features = 64
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "fc"]
        self.feature_info = [{"module": "layer1", "num_chs": 16, "reduction": 1},    # (B, 16, H, W)
                             {"module": "layer2", "num_chs": 32, "reduction": 2},    # (B, 32, H/2, W/2)
                             {"module": "layer3", "num_chs": 64, "reduction": 4}]    # (B, 64, H/4, W/4)
        mean, std = norm_stats(in_chans)
        self.default_cfg = dict(arch=arch, family="resnet" if residual else "plain",
                                layout="cifar", input_size=(in_chans, 32, 32), mean=mean,
                                std=std, num_classes=num_classes)
        self._init_weights(zero_init_residual)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)


# ----------------------------------------------------------------------------- builders

@register_model
def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n=3), 0.27M params."""
    return CifarResNet(3, arch="resnet20", **kwargs)


@register_model
def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 (n=5), 0.46M params."""
    return CifarResNet(5, arch="resnet32", **kwargs)


@register_model
def resnet44(**kwargs) -> CifarResNet:
    """ResNet-44 (n=7), 0.66M params."""
    return CifarResNet(7, arch="resnet44", **kwargs)


@register_model
def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (n=9), 0.85M params."""
    return CifarResNet(9, arch="resnet56", **kwargs)


@register_model
def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110 (n=18), 1.7M params."""
    return CifarResNet(18, arch="resnet110", **kwargs)


@register_model
def plain20(**kwargs) -> CifarResNet:
    """Plain-20: resnet20 without shortcuts."""
    return CifarResNet(3, residual=False, arch="plain20", **kwargs)


@register_model
def plain32(**kwargs) -> CifarResNet:
    """Plain-32: resnet32 without shortcuts."""
    return CifarResNet(5, residual=False, arch="plain32", **kwargs)


@register_model
def plain44(**kwargs) -> CifarResNet:
    """Plain-44: resnet44 without shortcuts."""
    return CifarResNet(7, residual=False, arch="plain44", **kwargs)


@register_model
def plain56(**kwargs) -> CifarResNet:
    """Plain-56: resnet56 without shortcuts."""
    return CifarResNet(9, residual=False, arch="plain56", **kwargs)


@register_model
def plain110(**kwargs) -> CifarResNet:
    """Plain-110: resnet110 without shortcuts."""
    return CifarResNet(18, residual=False, arch="plain110", **kwargs)

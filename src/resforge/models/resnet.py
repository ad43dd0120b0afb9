"""ImageNet-layout ResNets (He et al. 2015) with torchvision's state-dict key names.

Layout: 7x7/2 conv stem + 3x3/2 max-pool, then four stages (64/128/256/512 base widths) of
BasicBlocks (ResNet-18/34) or Bottlenecks (ResNet-50/101/152, stride on the 3x3 conv as in
"ResNet v1.5"), global average pool, fc. Keys: conv1, bn1, layer1..4.N.{conv1,bn1,conv2,bn2,
conv3,bn3,downsample.0,downsample.1}, fc -- so torchvision and timm weights load without
any renaming.

`ResNetBase` holds the model contract shared with the CIFAR networks (cifar_resnet.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from resforge.models import register_model
from resforge.models.stages import StageOutputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for `in_chans` channels (non-RGB inputs get the RGB average per channel)."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (mean,) * in_chans, (std,) * in_chans


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # BN follows: no bias


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


# ----------------------------------------------------------------------------- blocks

class BasicBlock(nn.Module):
    """Two 3x3 convs + shortcut. (B, inplanes, H, W) -> (B, planes, H/stride, W/stride).

    `downsample` maps the input onto the output shape when they differ (None = identity).
    `residual=False` drops the shortcut altogether: the "plain" nets of He et al. use it.
    """
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, residual: bool = True):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand to planes*4, + shortcut.

    (B, inplanes, H, W) -> (B, planes*4, H/stride, W/stride).
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


# ----------------------------------------------------------------------------- stages

def make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int,
               stride: int = 1) -> nn.Sequential:
    """`blocks` blocks; only the first changes resolution/width, through a 1x1 conv + BN projection."""
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        downsample = nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- networks

class ResNetBase(StageOutputs, nn.Module):
    """The model contract (docs/DESIGN.md) shared by every resforge network.

    Subclasses build conv1, bn1, the stage modules named in `stage_names`, `global_pool`,
    `drop`, `fc`, set `num_features`/`default_cfg`/`feature_info`, and implement `forward_stem`
    (stages.py runs the stages: forward_features, forward_intermediates).
    """
    stage_names: list[str]
    num_features: int
    default_cfg: dict

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)  # (B, C, h, w) -> (B, C)
        if pre_logits:
            return x  # pooled features, before dropout
        return self.fc(self.drop(x))  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """New, freshly initialised fc for `num_classes` (0 = no classifier: forward gives features)."""
        ref = self.fc.weight if isinstance(self.fc, nn.Linear) else self.conv1.weight
        self.num_classes = num_classes
        self.default_cfg["num_classes"] = num_classes
        if num_classes <= 0:
            self.fc = nn.Identity()
        else:
            self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)

    def get_stage(self, name: str) -> nn.Module:
        """The module(s) of one stage; "stem" is a fresh ModuleList [conv1, bn1] (not a child,
        so the state dict is unchanged) -- iterate it like a list or call .parameters()."""
        if name not in self.stage_names:
            raise KeyError(f"unknown stage {name!r}; stages are {self.stage_names}")
        if name == "stem":
            return nn.ModuleList([self.conv1, self.bn1])
        return getattr(self, name)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # Kaiming-normal convs (He et al. 2015, fan_out keeps backward activations' scale);
        # BN as identity. fc keeps PyTorch's default uniform init.
        if self.conv1.weight.is_meta:  # shapes only (model_info): nothing to fill, and meta
            return                     # normal_() would import torch._dynamo (seconds)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock) and m.residual:  # a plain block would output 0
                    nn.init.zeros_(m.bn2.weight)


class ResNet(ResNetBase):
    """ImageNet ResNet. (B, in_chans, H, W) -> (B, num_classes); features are (B, 512*exp, H/32, W/32).

    small_input=True: the "CIFAR variant" stem (3x3 stride-1 conv1, no max-pool) for 32x32
    images -- same keys, only conv1's kernel shape changes; features are then (B, C, H/8, W/8).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.0, zero_init_residual: bool = False,
                 small_input: bool = False, arch: str = "resnet"):
        super().__init__()
        self.num_classes = num_classes
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        inplanes = 64
        for i, (planes, n, stride) in enumerate(zip(widths, layers, strides)):
            setattr(self, f"layer{i + 1}", make_stage(block, inplanes, planes, n, stride))
            inplanes = planes * block.expansion
        self.num_features = inplanes
        self.global_pool = nn.AdaptiveAvgPool2d(1)  # any input size works
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
        first = 1 if small_input else 4           # C2..C5: (B, 64*exp, H/4, .) ... (B, 512*exp, H/32, .)
        self.feature_info = [{"module": f"layer{i + 1}", "num_chs": w * block.expansion, "reduction": first * 2 ** i}
                             for i, w in enumerate(widths)]
        mean, std = norm_stats(in_chans)
        size = 32 if small_input else 224
        self.default_cfg = dict(arch=arch, family="resnet", layout="imagenet",
                                input_size=(in_chans, size, size), mean=mean, std=std,
                                num_classes=num_classes)
        self._init_weights(zero_init_residual)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4); small_input: (B, 64, H, W)


# ----------------------------------------------------------------------------- builders

@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: BasicBlock x (2, 2, 2, 2), 11.7M params."""
    return ResNet(BasicBlock, [2, 2, 2, 2], arch="resnet18", **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34: BasicBlock x (3, 4, 6, 3), 21.8M params."""
    return ResNet(BasicBlock, [3, 4, 6, 3], arch="resnet34", **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: Bottleneck x (3, 4, 6, 3), 25.6M params."""
    return ResNet(Bottleneck, [3, 4, 6, 3], arch="resnet50", **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101: Bottleneck x (3, 4, 23, 3), 44.5M params."""
    return ResNet(Bottleneck, [3, 4, 23, 3], arch="resnet101", **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152: Bottleneck x (3, 8, 36, 3), 60.2M params."""
    return ResNet(Bottleneck, [3, 8, 36, 3], arch="resnet152", **kwargs)

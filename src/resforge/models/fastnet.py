"""Fast CIFAR networks: the airbench94 shape (Jordan 2024) and David Page's ResNet-9.

airbench94: a frozen 2x2 *whitening* conv (its filters are the eigenvectors of the data's
2x2-patch covariance, scaled to unit variance, plus their negatives: 2*C*4 = 24 channels for
RGB), GELU, three conv groups of widths 64/256/256, each
    conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU,
a global max-pool and a bias-free linear head whose logits are scaled by 1/9.  BN scales are
frozen at 1 and BN biases train at a higher rate (`param_group_hints`); every 3x3 conv starts
as (partly) the identity (Dirac init).  32x32 inputs give 31 -> 15 -> 7 -> 3 spatial sizes.

The whitening conv needs the data: `init_from_data(images_u8, mean, std)` is called by
`resforge.train_run.train` with a sample of the training images before fitting (any model that has
the method gets this call).  `whitening_filters` is the pure function behind it.

Model contract (docs/DESIGN.md): stages are ["stem", "layer1", "layer2", "layer3", "fc"];
"stem" is [conv1] (the whitening conv; there is no bn1).  The head pools by *max*, not
average (airbench's final MaxPool2d(3) over a 3x3 map is exactly a global max-pool).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from resforge.models import register_model
from resforge.models.resnet import norm_stats
from resforge.models.stages import StageOutputs

# ----------------------------------------------------------------------------- whitening


def extract_patches(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """All stride-1 kh x kw patches: (N, C, H, W) -> (N * (H-kh+1) * (W-kw+1), C, kh, kw)."""
    n, c = x.shape[:2]
    p = x.unfold(2, kh, 1).unfold(3, kw, 1)             # (N, C, H', W', kh, kw)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, kh, kw)


def whitening_filters(patches: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """Conv filters that whiten patches: (N, C, kh, kw) -> (2*D, C, kh, kw), D = C*kh*kw.

    With S = E[p p^T] (uncentred: the inputs are already normalised) = V diag(l) V^T, filter i
    is v_i / sqrt(l_i + eps), largest eigenvalue first, so the first D outputs have covariance
    diag(l / (l + eps)) ~ I.  The last D filters are the negatives, so that a following GELU
    keeps both signs of every whitened direction."""
    n, c, kh, kw = patches.shape
    flat = patches.reshape(n, -1).float()                           # (N, D)
    cov = (flat.T @ flat).double() / n                              # (D, D); eigh in fp64 for accuracy
    evals, evecs = torch.linalg.eigh(cov)                           # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)                     # largest first
    filt = evecs.T / torch.sqrt(evals.clamp(min=0) + eps)[:, None]  # (D, D): row i = v_i / sqrt(l_i + eps)
    filt = filt.reshape(-1, c, kh, kw).float()
    return torch.cat([filt, -filt])


def normalise_u8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (x/255 - mean) / std, as resforge's Augmenter does."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


# ----------------------------------------------------------------------------- blocks


def frozen_scale_bn(channels: int, momentum: float = 0.4, eps: float = 1e-12) -> nn.BatchNorm2d:
    """BN whose scale stays 1 (requires_grad off; `param_group_hints` also keeps it out of the
    optimiser).  momentum 0.4 = fast running statistics, which airbench pairs with lookahead."""
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


def dirac_conv3x3(cin: int, cout: int) -> nn.Conv2d:
    """3x3 'same' conv, default init, whose first min(cin, cout) filters are the identity."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    if not conv.weight.is_meta:            # model_info builds on the meta device: nothing to fill
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


class ConvGroup(nn.Module):
    """(B, cin, H, W) -> (B, cout, H//2, W//2): conv, pool, BN, GELU, conv, BN, GELU."""

    def __init__(self, cin: int, cout: int, bn_momentum: float = 0.4):
        super().__init__()
        self.conv1 = dirac_conv3x3(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = frozen_scale_bn(cout, bn_momentum)
        self.conv2 = dirac_conv3x3(cout, cout)
        self.bn2 = frozen_scale_bn(cout, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))      # pool before BN: 4x less BN work
        return self.act(self.bn2(self.conv2(x)))


class HeadMixin(StageOutputs):
    """forward_head / forward / reset_classifier / get_stage shared by the fast nets: global
    max-pool -> dropout -> bias-free fc, logits multiplied by `head_scale` (a small constant
    keeps the early softmax soft; the fc itself keeps PyTorch's default init)."""
    conv1: nn.Conv2d
    fc: nn.Module
    global_pool: nn.Module
    drop: nn.Module
    head_scale: float
    bias_lr_scale: float
    frozen_bn_scale: bool
    num_features: int
    num_classes: int
    default_cfg: dict
    stage_names: list[str]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)               # (B, C, h, w) -> (B, C)
        if pre_logits:
            return x
        if self.num_classes <= 0:                               # headless: pooled features
            return x
        return self.fc(self.drop(x)) * self.head_scale          # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        ref = self.fc.weight if isinstance(self.fc, nn.Linear) else self.conv1.weight
        self.num_classes = num_classes
        self.default_cfg["num_classes"] = num_classes
        self.fc = (nn.Linear(self.num_features, num_classes, bias=False, device=ref.device, dtype=ref.dtype)
                   if num_classes > 0 else nn.Identity())

    def get_stage(self, name: str) -> nn.Module:
        if name not in self.stage_names:
            raise KeyError(f"unknown stage {name!r}; stages are {self.stage_names}")
        if name == "stem":
            return nn.ModuleList(self._stem_modules())
        return getattr(self, name)

    def _stem_modules(self) -> list[nn.Module]:
        return [self.conv1]

    def param_group_hints(self) -> dict[str, dict]:
        """Optimiser hints (consumed by training.optim.param_groups): BN scales frozen, BN
        biases at `bias_lr_scale` x the rate with weight decay / bias_lr_scale (so their
        per-step decay equals everyone else's), plus whatever `_extra_hints` adds."""
        hints = dict(self._extra_hints())
        for name, m in self.named_modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                if self.frozen_bn_scale:
                    hints[f"{name}.weight"] = {"frozen": True}
                hints[f"{name}.bias"] = {"lr_scale": self.bias_lr_scale, "wd_scale": 1 / self.bias_lr_scale}
        return hints

    def _extra_hints(self) -> dict[str, dict]:
        return {}


def _head(model, num_features: int, num_classes: int, drop_rate: float, head_scale: float) -> None:
    model.num_features, model.num_classes, model.head_scale = num_features, num_classes, head_scale
    model.global_pool = nn.AdaptiveMaxPool2d(1)                 # any input size
    model.drop = nn.Dropout(drop_rate)
    model.fc = nn.Linear(num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()


# ----------------------------------------------------------------------------- airbench94


class FastNet(HeadMixin, nn.Module):
    """airbench94-shaped net. (B, in_chans, H, W) -> (B, num_classes); features (B, 256, h, w)
    with h = ((H - 1) // 2 // 2) // 2 (3 for 32x32 inputs).  1.97M params at 10 classes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths=(64, 256, 256),
                 drop_rate: float = 0.0, bn_momentum: float = 0.4, head_scale: float = 1 / 9,
                 bias_lr_scale: float = 64.0, whiten_eps: float = 5e-4, arch: str = "airbench94"):
        super().__init__()
        whiten = 2 * in_chans * 2 * 2                  # +/- each of the C*2*2 patch eigenvectors
        self.conv1 = nn.Conv2d(in_chans, whiten, 2, padding=0, bias=True)
        self.conv1.weight.requires_grad_(False)        # set by init_from_data, then frozen
        self.act = nn.GELU()
        self.layer1 = ConvGroup(whiten, widths[0], bn_momentum)
        self.layer2 = ConvGroup(widths[0], widths[1], bn_momentum)
        self.layer3 = ConvGroup(widths[1], widths[2], bn_momentum)
        _head(self, widths[2], num_classes, drop_rate, head_scale)
        self.bias_lr_scale, self.whiten_eps, self.frozen_bn_scale = bias_lr_scale, whiten_eps, True
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "fc"]
        # (B, 64, (H-1)//2, .), (B, 256, (H-1)//4, .), (B, 256, (H-1)//8, .): nominally H/2, H/4, H/8
        self.feature_info = [{"module": f"layer{i + 1}", "num_chs": w, "reduction": 2 ** (i + 1)}
                             for i, w in enumerate(widths)]
        mean, std = norm_stats(in_chans)
        self.default_cfg = dict(arch=arch, family="plain", layout="cifar", input_size=(in_chans, 32, 32),
                                mean=mean, std=std, num_classes=num_classes)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x))     # (B, 24, H-1, W-1): the 2x2 whitening conv, no padding

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, mean, std) -> None:
        """Set the whitening conv from uint8 images (N, C, H, W) (a few thousand are plenty)
        normalised with the run's mean/std; its bias starts at zero and stays trainable."""
        x = normalise_u8(images.cpu(), mean, std)
        filters = whitening_filters(extract_patches(x, *self.conv1.kernel_size), self.whiten_eps)
        self.conv1.weight.copy_(filters.to(self.conv1.weight))
        self.conv1.bias.zero_()

    def _extra_hints(self) -> dict[str, dict]:
        return {"conv1.weight": {"frozen": True}}


# ----------------------------------------------------------------------------- ResNet-9


def conv_bn(cin: int, cout: int, bn_momentum: float, pool: bool = False) -> nn.Sequential:
    """conv3x3 -> [max-pool 2] -> BN -> ReLU: (B, cin, H, W) -> (B, cout, H or H/2, .)."""
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    layers += [nn.MaxPool2d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm2d(cout, momentum=bn_momentum), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + f(x), f = two conv_bn at constant width."""

    def __init__(self, channels: int, bn_momentum: float):
        super().__init__()
        self.res1 = conv_bn(channels, channels, bn_momentum)
        self.res2 = conv_bn(channels, channels, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(HeadMixin, nn.Module):
    """Page's ResNet-9 (DAWNBench 2018). prep 64 -> layer1 128 (+res) -> layer2 256 ->
    layer3 512 (+res) -> global max-pool -> fc * 1/8.  (B, C, 32, 32) -> features (B, 512, 4, 4).
    BN scales train here; BN biases still get `bias_lr_scale` through param_group_hints."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 bn_momentum: float = 0.1, head_scale: float = 0.125, bias_lr_scale: float = 1.0,
                 arch: str = "resnet9"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(conv_bn(64, 128, bn_momentum, pool=True), Residual(128, bn_momentum))
        self.layer2 = conv_bn(128, 256, bn_momentum, pool=True)
        self.layer3 = nn.Sequential(conv_bn(256, 512, bn_momentum, pool=True), Residual(512, bn_momentum))
        _head(self, 512, num_classes, drop_rate, head_scale)
        self.bias_lr_scale, self.frozen_bn_scale = bias_lr_scale, False
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "fc"]
        self.feature_info = [{"module": "layer1", "num_chs": 128, "reduction": 2},   # (B, 128, H/2, W/2)
                             {"module": "layer2", "num_chs": 256, "reduction": 4},   # (B, 256, H/4, W/4)
                             {"module": "layer3", "num_chs": 512, "reduction": 8}]   # (B, 512, H/8, W/8)
        mean, std = norm_stats(in_chans)
        self.default_cfg = dict(arch=arch, family="resnet", layout="cifar", input_size=(in_chans, 32, 32),
                                mean=mean, std=std, num_classes=num_classes)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))  # (B, 64, H, W)

    def _stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]


# ----------------------------------------------------------------------------- builders


@register_model
def airbench94(**kwargs) -> FastNet:
    """airbench94-shaped net (whitened 2x2 stem, 64/256/256 conv groups), 1.97M params."""
    return FastNet(**kwargs)


@register_model
def resnet9(**kwargs) -> ResNet9:
    """Page's ResNet-9 (64/128/256/512, two residual blocks), 6.6M params."""
    return ResNet9(**kwargs)

"""Heads on frozen features: features computed once and cached, a linear probe trained on them
through the ordinary loop, and a prototype (nearest-class-mean) head that needs no training.

The probe is `fit` run on (N, D, 1, 1) feature "images" with an identity augmenter: the same
optimiser, schedule, early stopping and restore-best as any run, but each epoch over cached
features costs milliseconds instead of a pass through the backbone.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resforge.config import OptimConfig, RunConfig, TrainConfig
from resforge.progress import Bar
from resforge.training.loop import fit, recalibrate_bn


@torch.no_grad()
def extract_features(model: nn.Module, batches, augment, rt,
                     desc: str = "extracting features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (N, D) fp32 on CPU and labels (N,), in split order; the
    backbone runs in eval mode (BN uses its running statistics), images as at evaluation."""
    model.eval()
    feats, labels = [], []
    with Bar(desc=desc, total=getattr(batches, "num_images", None)) as bar:
        for x_u8, y, _ in batches.batches(None):
            x = augment.eval_view(x_u8)
            with rt.autocast():
                f = model.forward_head(model.forward_features(rt.to_input(x)), pre_logits=True)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
            bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def reestimate_bn(model: nn.Module, bns: list[nn.Module], batches, augment, rt) -> None:
    """AdaBN (Li et al. 2016): replace the running mean/var of `bns` by the new data's, a
    cumulative average over one pass of un-augmented images; every other layer stays in eval
    mode and no weight changes. Afterwards eval-mode features match what those layers compute
    in training mode, so a head fitted on cached features fits the network fine-tuning starts
    from (measured without it: pretrained ResNet-18 features on BreastMNIST spread 14x wider
    in train mode, and the probe-initialised head blew the first epoch's loss up to 140)."""
    recalibrate_bn(model, batches, augment, rt, bns=bns)       # the training loop's pass, over every image


class FeatureBatches:
    """Batches of cached features shaped (B, D, 1, 1), with the TensorBatches interface."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 sample_weights: np.ndarray | None = None, device: torch.device | str = "cpu"):
        self.x = feats.to(device)[:, :, None, None]
        self.y = labels.to(device)
        self.batch_size, self.shuffle, self.device = batch_size, shuffle, torch.device(device)
        self.weights = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float32,
                                                                           device=device)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def batches(self, g: torch.Generator | None = None):
        n = len(self.y)
        if self.shuffle and self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(n, generator=g, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx], idx


class IdentityAugment:
    """The augmenter interface for features that are already inputs: no change."""
    out_hw = (1, 1)

    def __call__(self, x, y, index, epoch, g):
        return x, y

    def eval_view(self, x):
        return x


def feature_scale(std: torch.Tensor) -> torch.Tensor:
    """Per-feature divisor for standardising (D,): the std, floored at a tenth of the median std.
    Near-constant features (ReLU units almost never active on the new data) must not be blown
    up: folded into the model's fc (W / sd) they would get weights 1000x the others, and the
    first fine-tuning steps that wake them would explode the logits."""
    std = std.detach().float().cpu()
    active = std[std > 0]
    floor = 0.1 * float(active.median()) if len(active) else 1.0
    return std.clamp(min=max(floor, 1e-6)).clone()


class ProbeHead(nn.Module):
    """standardise -> dropout -> fc on pooled features. Standardising (with the training
    features' mean/std, fixed buffers) makes the convex probe well conditioned whatever the
    backbone's feature scale; `model_fc_state()` folds it back into a plain fc for the model."""

    def __init__(self, fc: nn.Linear, drop_rate: float = 0.0, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None):
        super().__init__()
        d, bias = fc.in_features, fc.bias is not None
        # A head without bias cannot absorb a mean shift: such heads get scaling only.
        self.register_buffer("mu", mean.detach().float().cpu().clone() if mean is not None and bias
                             else torch.zeros(d))
        self.register_buffer("sd", torch.ones(d) if std is None else feature_scale(std))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(d, fc.out_features, bias=bias)
        with torch.no_grad():                             # start where the model's head is
            w = fc.weight.detach().float().cpu()
            self.fc.weight.copy_(w * self.sd)
            if bias:
                self.fc.bias.copy_(fc.bias.detach().float().cpu() + w @ self.mu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (torch.flatten(x, 1) - self.mu) / self.sd
        return self.fc(self.drop(z))

    @torch.no_grad()
    def init_from_class_means(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Euclidean nearest class mean is linear: argmin |z - m_c|^2 = argmax 2 z.m_c - |m_c|^2.
        Those weights, scaled so the logits spread by about one unit, start the probe."""
        z = (feats.float() - self.mu) / self.sd
        k = self.fc.out_features
        counts = torch.bincount(labels, minlength=k).clamp(min=1)
        means = torch.zeros(k, z.shape[1]).index_add_(0, labels, z) / counts[:, None]
        w, b = 2 * means, -(means ** 2).sum(1)
        b = b if self.fc.bias is not None else torch.zeros_like(b)
        spread = (z @ w.T + b).std().clamp(min=1e-6)
        self.fc.weight.copy_(w / spread)
        if self.fc.bias is not None:
            self.fc.bias.copy_(b / spread)

    @torch.no_grad()
    def model_fc_state(self) -> dict[str, torch.Tensor]:
        """fc weights for raw features: W' = W / sd, b' = b - W' mu."""
        w = self.fc.weight / self.sd
        if self.fc.bias is None:
            return {"weight": w.clone()}
        return {"weight": w.clone(), "bias": (self.fc.bias - w @ self.mu).clone()}


def probe_configs(optim: OptimConfig, train: TrainConfig, epochs: int, lr: float, wd: float
                  ) -> tuple[OptimConfig, TrainConfig]:
    """AdamW + cosine for a convex head (robust without tuning); label smoothing, patience and
    restore-best carry over from the run's own settings."""
    o = OptimConfig(name="adamw", lr=lr, weight_decay=wd, schedule="cosine", warmup_epochs=0,
                    label_smoothing=optim.label_smoothing, no_decay_norm_bias=True)
    t = dataclasses.replace(train, epochs=epochs, ema=None, compile=False, val_every=1)
    return o, t


def probe_head(fc: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, cfg: RunConfig) -> ProbeHead:
    """The probe's starting point: standardising buffers from the training features (N, D);
    weights from the class means, unless pretrained head rows were kept
    (finetune.keep_class_rows / class_map): then `fc` as it is."""
    head = ProbeHead(fc, cfg.model.drop_rate, feats.mean(0), feats.std(0) if len(feats) > 1 else None)
    if not (cfg.finetune.keep_class_rows or cfg.finetune.class_map):
        head.init_from_class_means(feats, labels)
    return head


def linear_probe(fc: nn.Linear, train_feats, val_feats, rt, cfg: RunConfig, *, loss_fn=None,
                 sample_weights=None, metrics_log=None):
    """Train a linear head on cached features with the training loop; -> (ProbeHead, FitResult).
    Epochs, rate and weight decay are cfg.finetune.probe_*; dropout is cfg.model.drop_rate.
    Starting from the class means (probe_head), even a short probe is no worse than them."""
    ft = cfg.finetune
    feats, labels = train_feats
    head = probe_head(fc, feats, labels, cfg).to(rt.device)
    o, t = probe_configs(cfg.optim, cfg.train, ft.probe_epochs, ft.probe_lr, ft.probe_weight_decay)
    # At least ~8 steps per epoch: tiny sets would otherwise get one or two updates an epoch.
    bs = max(1, min(cfg.train.batch_size, -(-len(labels) // 8)))
    tb = FeatureBatches(*train_feats, bs, shuffle=True, sample_weights=sample_weights, device=rt.device)
    vb = (FeatureBatches(*val_feats, cfg.train.eval_batch_size, device=rt.device)
          if val_feats is not None else None)
    result = fit(head, tb, vb, IdentityAugment(), rt, o, t, loss_fn=loss_fn, metrics_log=metrics_log,
                 desc="probe ")
    return result.model, result


@torch.no_grad()
def probe_logits(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    head.eval()
    p = next(head.parameters())
    return head(feats.to(p.device)[:, :, None, None]).float().cpu()


# ---------------------------------------------------------------- prototype head

class PrototypeHead:
    """Nearest class mean without training: features are centred on the training mean and
    L2-normalised (SimpleShot's CL2N, which makes plain cosine NCM competitive), logits are
    scale * cosine to each class mean. The scale is a temperature: it changes calibration,
    never the predicted class, so it is fitted on the validation split."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.center = feats.mean(0)
        z = self._embed(feats)
        sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"prototype head: classes {missing} have no training images; "
                             "every class needs at least one")
        self.protos = F.normalize(sums / counts[:, None], dim=1)
        self.scale = 10.0

    def _embed(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats - self.center, dim=1)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * self._embed(feats) @ self.protos.T

    def fit_scale(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """The scale minimising validation NLL over a log grid (1-D: a grid is exact enough)."""
        cos = self._embed(feats) @ self.protos.T
        grid = [10 ** (k / 20) for k in range(-20, 61)]   # 0.1 .. 1000
        nll = [F.cross_entropy(s * cos, labels).item() for s in grid]
        self.scale = grid[int(np.argmin(nll))] if all(map(math.isfinite, nll)) else 10.0
        return self.scale

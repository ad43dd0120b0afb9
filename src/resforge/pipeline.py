"""From a resolved config to what a training loop eats: the one path train, finetune, lr-find,
evaluate, export and the experiments share.

    config -> prepare_data      data bundle + split manifest (saved or fresh, train subset)
           -> build_model       model (+ pretrained weights, read by weightfile) + their preprocessing
              normalisation     the weights' mean/std, else channel_stats of the training images
              init_from_data    data-dependent initialisation (e.g. airbench94's whitening)
           -> start_runtime     seeded device/precision/threads (training/device.py)
              place_model       the model on the runtime's device and memory format
           -> train_batches, val_batches
    evaluate_bundle, tta_record    metrics per split of a trained model
    write_run_files                config.yaml/.json and splits.json of a new run folder

Nothing here knows a command: train_run.py, evaluation.py, finetune/ and experiments/ compose it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resforge import distributed as D
from resforge import ood
from resforge.atomic import atomic_write_text
from resforge.config import RunConfig
from resforge.data import load_manifest, load_source, make_splits, save_manifest, subset
from resforge.data.augment import Augmenter
from resforge.data.loader import make_batches
from resforge.data.sources import apply_class_names, read_class_names
from resforge.metrics import classification_metrics
from resforge.models import create_model
from resforge.runs import say
from resforge.training.device import Runtime, make_runtime, seed_everything, usable_cores
from resforge.training.loop import predict_logits
from resforge.weightfile import imagenet_stats, read_weights_file
from resforge.weights import load_weights


# ---------------------------------------------------------------- data

def prepare_data(cfg: RunConfig, manifest: dict | None = None):
    """Load the source, fix train/val/test (from a manifest when given), subset train."""
    d = cfg.data
    names = read_class_names(d.class_names) if d.class_names else None
    with D.rank_zero_first():          # distributed: one decode into the cache, then the others read it
        bundle = load_source(d.source, image_size=d.image_size, channels=d.channels, cache_dir=d.cache_dir,
                             download=d.download, data_root=d.data_root, stream=d.stream)
    if names is not None:
        bundle = apply_class_names(bundle, names, d.class_names)
    if manifest is None and d.manifest:
        manifest = load_manifest(d.manifest)
    bundle, manifest = make_splits(bundle, d.val_fraction, d.split_seed, manifest=manifest)
    if d.train_fraction is not None and manifest.get("train_fraction") is None:
        bundle = subset(bundle, "train", d.train_fraction, seed=d.split_seed)
        manifest = make_splits(bundle, manifest=_ids_manifest(bundle, manifest))[1]
        manifest["train_fraction"] = d.train_fraction
    return bundle, manifest


def _ids_manifest(bundle, base: dict) -> dict:
    return {**base, "splits": {s: list(sp.ids) for s, sp in bundle.splits.items()}}


def split_counts(bundle) -> dict:
    """{split: number of images}, as reports record them."""
    return {s: int(len(sp.labels)) for s, sp in bundle.splits.items()}


def channel_stats(bundle) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training images in [0, 1] (a 10k-image sample is plenty)."""
    sp = bundle.splits["train"]
    if sp.images is None:                       # streamed: fall back to ImageNet-style stats
        c = bundle.channels
        return [0.5] * c, [0.25] * c
    idx = np.linspace(0, len(sp.labels) - 1, num=min(len(sp.labels), 10_000)).astype(np.int64)
    x = torch.from_numpy(np.asarray(sp.images[idx])).float() / 255    # (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


# ---------------------------------------------------------------- model

def build_model(cfg: RunConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, dict, dict]:
    """The model of the config, its builder kwargs and, if it starts from weights, their
    normalisation ({} when training from scratch: statistics of the data are used)."""
    m = cfg.model
    kwargs = {k: v for k, v in (("shortcut", m.shortcut), ("small_input", m.small_input)) if v is not None}
    if m.drop_rate:
        kwargs["drop_rate"] = m.drop_rate
    model = create_model(m.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not m.pretrained:
        return model, kwargs, {}
    wf = read_weights_file(m.pretrained)        # the config's model.name is built; the file must fit it
    load_weights(model, wf.state_dict, head="keep-matching", source=str(wf.path))
    # A sidecar's statistics when they are per channel of this data; else ImageNet's (third-party
    # weights were trained with them), averaged over RGB for other channel counts.
    mean, std = (wf.mean, wf.std) if len(wf.mean) == in_chans else imagenet_stats(in_chans)
    return model, kwargs, {"mean": mean, "std": std}


def normalisation(pre: dict, bundle) -> tuple[list[float], list[float]]:
    """The input mean/std: those of the weights (build_model's third value), else the data's."""
    return (pre["mean"], pre["std"]) if pre.get("mean") else channel_stats(bundle)


def init_from_data(model: nn.Module, bundle, mean, std, n: int = 5000) -> None:
    """Data-dependent initialisation for models that define `init_from_data(images_u8 (N, C, H, W),
    mean, std)` (e.g. airbench94's whitening conv), fed a strided sample of the training images."""
    hook = getattr(model, "init_from_data", None)
    sp = bundle.splits["train"]
    if hook is None:
        return
    if sp.images is None:
        say(f"  {type(model).__name__}.init_from_data skipped: streamed training data is not in memory")
        return
    idx = np.linspace(0, len(sp.labels) - 1, num=min(len(sp.labels), n)).astype(np.int64)
    hook(torch.from_numpy(np.asarray(sp.images[idx])), mean, std)


# ---------------------------------------------------------------- runtime and batches

def start_runtime(cfg: RunConfig, distributed: bool = False) -> Runtime:
    """Seed every generator (train.seed, train.deterministic), then the device/precision runtime.
    distributed: the caller shards its batches, so a process torchrun started joins the process
    group (resforge/distributed.py); without it such a process is refused (not N silent copies)."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    t = cfg.train
    if distributed and D.launched():
        device = D.setup(t.device)
        threads = t.threads if t.threads is not None or device.startswith("cuda") else \
            D.cpu_threads_share(usable_cores())
        return make_runtime(device, t.precision, t.channels_last, threads, distributed=True)
    return make_runtime(t.device, t.precision, t.channels_last, t.threads)


def place_model(model: nn.Module, rt: Runtime) -> nn.Module:
    """The model on the runtime's device, channels-last when the runtime uses it."""
    return model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)


def train_batches(cfg: RunConfig, bundle, rt: Runtime):
    """Shuffled training batches of train.batch_size (the last partial batch dropped); under
    torch.distributed this rank's share of each global batch."""
    return make_batches(bundle, "train", rt.device, cfg.train.batch_size, train=True, workers=cfg.data.workers,
                        shard=True)


def val_batches(cfg: RunConfig, bundle, rt: Runtime):
    """Validation batches in order, or None when there is no validation split (data.val_fraction=0);
    under torch.distributed this rank's slice (fit gathers the logits)."""
    if not len(bundle.splits["val"].labels):
        return None
    return make_batches(bundle, "val", rt.device, cfg.train.eval_batch_size, train=False, workers=cfg.data.workers,
                        shard=True)


# ---------------------------------------------------------------- evaluation and records

def evaluate_bundle(model: nn.Module, bundle, augment: Augmenter, rt: Runtime, splits, tta: bool,
                    batch_size: int, workers: int = 2, keep_logits: dict | None = None) -> dict:
    """{split: classification metrics and MSP calibration} of `model` on the named splits that hold
    images; keep_logits, if given, gets {split: (N, K) logits} unless tta (for the OOD threshold:
    predict and serve score single views)."""
    out = {}
    for s in splits:
        if s not in bundle.splits or len(bundle.splits[s].labels) == 0:
            continue
        batches = make_batches(bundle, s, rt.device, batch_size, train=False, workers=workers, shard=True)
        views = f" (TTA x{len(augment.tta_view_names())})" if tta else ""
        logits, labels = predict_logits(model, batches, augment, rt, tta=tta, desc=f"evaluating {s}{views}")
        out[s] = classification_metrics(logits.numpy(), labels.numpy(), list(bundle.class_names))
        out[s]["tta"] = tta
        out[s]["calibration"] = ood.calibration(logits, labels)
        if keep_logits is not None and not tta:
            keep_logits[s] = logits
        if tta:
            out[s]["tta_views"] = augment.tta_view_names()
    return out


def tta_record(augment: Augmenter, source: str) -> dict:
    """report.json's "tta": the views averaged and where their choice came from."""
    a = augment.cfg
    return {"views": augment.tta_view_names(), "from": source,
            "aug": {"flip": a.flip, "translate": a.translate}}


def write_run_files(run_dir: Path, cfg: RunConfig, manifest: dict, bundle) -> None:
    """A run folder's config.yaml, config.json and splits.json (what resume and evaluate read back)."""
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    save_manifest(run_dir / "splits.json", manifest)

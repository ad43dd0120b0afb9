"""`finetune` and `lr_find`: the API behind `resforge finetune` and `resforge lr-find`.

finetune: load pretrained weights into a network with a head for the new classes, cache the
frozen backbone's features once, score (a) a prototype head and (b) a linear probe on them,
then run the policy's phases, each one call of the training loop, and write the run folder
(weights, config, splits, metrics.csv, results.png) and the before/after report.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resforge.config import RunConfig, load_config
from resforge.data.augment import Augmenter
from resforge.data.loader import TensorBatches, make_batches
from resforge.finetune import policies as P
from resforge.finetune.lrfind import lr_range_test, plot_lr_find
from resforge.finetune.probe import (FeatureBatches, IdentityAugment, PrototypeHead, extract_features,
                                     linear_probe, probe_configs, probe_head, probe_logits, reestimate_bn)
from resforge.finetune.report import comparison_row, write_finetune_report
from resforge.finetune.source import (Pretrained, build_from_pretrained, class_row_map, input_stats,
                                      keep_class_rows, read_pretrained)
from resforge.metrics import classification_metrics
from resforge.runs import MetricsLog, is_main_process, new_run_dir
from resforge.training.device import make_runtime, seed_everything
from resforge.training.loop import fit, soft_cross_entropy


@dataclass
class FinetuneRun:
    dir: Path
    config: RunConfig
    model: nn.Module                 # the fine-tuned network (LoRA merged, every BN released)
    meta: dict                       # the checkpoint sidecar
    results: dict                    # split -> metrics of the final model
    rows: list[dict]                 # the comparison rows (a), (b), (c)
    phases: list[dict]               # per phase: trainable params, epochs run, seconds, ...
    train_seconds: float


@dataclass
class _Setup:
    """Everything finetune and lr_find share: config, data, model, batches, loss."""
    cfg: RunConfig
    rt: object
    bundle: object
    manifest: dict
    pre: Pretrained
    model: nn.Module
    kwargs: dict
    augment: Augmenter
    mean: list
    std: list
    phases: list
    loss_fn: object
    sample_weights: np.ndarray | None
    train_batches: object
    val_batches: object | None
    notes: list
    bn: str = "train"                # finetune.bn resolved ("auto" -> "train" + keep_stats)
    keep_stats: frozenset = frozenset()   # BN layers kept in eval mode although their stage trains


def _say(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def resolve_config(recipe=None, overrides=None, *, data=None, policy=None, source=None,
                   config: RunConfig | None = None) -> RunConfig:
    cfg = config or load_config(recipe, overrides)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), finetune=dataclasses.replace(cfg.finetune),
                              model=dataclasses.replace(cfg.model))
    if data is not None:
        cfg.data.source = str(data)
    if policy is not None:
        cfg.finetune.policy = policy
    if source is not None:
        cfg.model.pretrained = str(source)
    return cfg


def _setup(cfg: RunConfig, source, model_name: str | None) -> _Setup:
    from resforge.api import prepare_data                # api imports this module lazily: no cycle
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rt = make_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last)
    pre = read_pretrained(source, model_name, cfg.finetune.source_classes)
    bundle, manifest = prepare_data(cfg)
    model, kwargs, notes = _model(cfg, pre, bundle)
    phases = P.plan(cfg.finetune.policy, model, cfg.finetune, cfg.train.epochs)   # bad policy: fail now
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    mean, std = input_stats(pre, bundle.channels)
    side = cfg.finetune.input_size
    out_hw = (side, side) if side else tuple(bundle.image_size)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), out_hw, seed=cfg.train.seed)
    sample_weights, class_w = _imbalance(bundle, cfg)
    tb = _train_batches(bundle, cfg, rt, sample_weights)
    vb = (make_batches(bundle, "val", rt.device, cfg.train.eval_batch_size, train=False, workers=cfg.data.workers)
          if len(bundle.splits["val"].labels) else None)
    bn, keep = P.resolve_bn(model, cfg.finetune.bn, (bundle.channels, *out_hw), cfg.train.batch_size,
                            cfg.finetune.bn_min_values, pretrained=pre.fmt != "scratch", phases=phases)
    if keep:
        notes.append(f"finetune.bn=auto: {len(keep)} BN layers keep running statistics (re-estimated on the training "
                     f"images where their stage trains) "
                     f"(a batch of {cfg.train.batch_size} gives their channels < {cfg.finetune.bn_min_values} "
                     f"values at {out_hw[0]}x{out_hw[1]} px): {_first(sorted(keep))}")
    return _Setup(cfg, rt, bundle, manifest, pre, model, kwargs, augment, mean, std, phases,
                  soft_cross_entropy(cfg.optim.label_smoothing, class_w), sample_weights, tb, vb, notes, bn, keep)


def _first(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _model(cfg: RunConfig, pre: Pretrained, bundle) -> tuple[nn.Module, dict, list[str]]:
    """The pretrained network with a head for the data's classes (rows kept where asked)."""
    from resforge.api import channel_stats
    if pre.fmt == "scratch":                             # the control: the data's own statistics
        pre.kwargs = {k: v for k, v in (("shortcut", cfg.model.shortcut), ("small_input", cfg.model.small_input))
                      if v is not None}
        pre.in_chans = bundle.channels
        pre.mean, pre.std = channel_stats(bundle)
    names = list(bundle.class_names)
    model, kwargs = build_from_pretrained(pre, len(names), bundle.channels, cfg.model.drop_rate)
    notes = _adaptation_notes(pre, bundle, cfg)
    if cfg.finetune.keep_class_rows or cfg.finetune.class_map:
        rows = class_row_map(names, pre.class_names, cfg.finetune.class_map)
        keep_class_rows(model, pre, rows)
        pairs = ", ".join(f"{names[i]}<-{pre.class_names[j] if pre.class_names else j}" for i, j in list(rows.items())[:8])
        notes.append(f"head rows kept from the pretrained classes for {len(rows)} of {len(names)} classes: {pairs}")
    return model, kwargs, notes


def _adaptation_notes(pre: Pretrained, bundle, cfg: RunConfig) -> list[str]:
    if pre.fmt == "scratch":
        return [f"{pre.arch} randomly initialised: the from-scratch control, same pipeline as fine-tuning"]
    notes = []
    if bundle.channels != pre.in_chans:
        notes.append(f"stem adapted from {pre.in_chans} to {bundle.channels} input channels "
                     "(filters summed for grey input; or convert the data with data.channels=3)")
    side = cfg.finetune.input_size or bundle.image_size[0]
    trained = pre.input_size[-1]
    if side * 2 <= trained:
        notes.append(f"the weights were trained at {trained} px but see {side} px here: "
                     f"finetune.input_size={trained} upsamples each batch on the fly (slower, usually better)")
    elif side != bundle.image_size[0]:
        notes.append(f"images stored at {bundle.image_size[0]} px are resized to {side} px per batch")
    if cfg.eval.tta:
        notes.append("row (c) uses test-time augmentation (eval.tta); rows (a) and (b) score single views")
    return notes


def _imbalance(bundle, cfg: RunConfig) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """Per-image draw weights (balanced sampling) and per-class loss weights (class_weights),
    both from inverse class frequency of the training split: w_c = N / (K * n_c)."""
    labels = bundle.splits["train"].labels
    k = len(bundle.class_names)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    inv = np.where(counts > 0, len(labels) / (k * np.maximum(counts, 1)), 0.0)
    sample = inv[labels] if cfg.finetune.balanced_sampling else None
    class_w = torch.tensor(inv, dtype=torch.float32) if cfg.finetune.class_weights == "balanced" else None
    return sample, class_w


def _train_batches(bundle, cfg: RunConfig, rt, sample_weights):
    sp = bundle.splits["train"]
    if sample_weights is None:
        return make_batches(bundle, "train", rt.device, cfg.train.batch_size, train=True, workers=cfg.data.workers)
    if sp.images is None:
        raise ValueError("finetune.balanced_sampling needs the training images in memory, but data.stream=true: "
                         "set data.stream=false, or use finetune.class_weights=balanced instead")
    return TensorBatches(sp.images, sp.labels, rt.device, cfg.train.batch_size, shuffle=True, drop_last=True,
                         sample_weights=sample_weights)


class _PhaseLog:
    """metrics.csv rows of one phase: a `phase` column and epochs counted across phases."""

    def __init__(self, log: MetricsLog, phase: str, offset: int):
        self.log, self.phase, self.offset = log, phase, offset

    def append(self, row: dict) -> None:
        self.log.append({**row, "epoch": row["epoch"] + self.offset, "phase": self.phase})

    def truncate(self, last_epoch: int) -> None:      # phases never resume
        pass


# ---------------------------------------------------------------- features, prototype, probe

def _features(s: _Setup, splits=("train", "val", "test")) -> dict:
    """Frozen-backbone features of every split, computed once (BN in eval mode, no augmentation)."""
    out, seconds = {}, {}
    for split in splits:
        if len(s.bundle.splits[split].labels):
            t0 = time.perf_counter()
            b = make_batches(s.bundle, split, s.rt.device, s.cfg.train.eval_batch_size, train=False,
                             workers=s.cfg.data.workers)
            out[split] = extract_features(s.model, b, s.augment, s.rt)
            seconds[split] = time.perf_counter() - t0
    _say(f"features cached: {', '.join(f'{k} {tuple(v[0].shape)}' for k, v in out.items())} "
         f"in {sum(seconds.values()):.1f}s")
    out["seconds"] = seconds["train"]          # what training a head costs: the train split's pass
    return out


def _prototype_row(s: _Setup, feats: dict, names: list[str]) -> dict:
    t0 = time.perf_counter()
    head = PrototypeHead(*feats["train"], len(names))
    head.fit_scale(*(feats.get("val") or feats["train"]))
    seconds = time.perf_counter() - t0 + feats["seconds"]
    m = classification_metrics(head.logits(feats["test"][0]).numpy(), feats["test"][1].numpy(), names)
    return comparison_row("a", "prototype head (nearest class mean), no training", m, train_seconds=seconds,
                          trainable_params=0, class_names=names, scale=head.scale)


def _probe(s: _Setup, feats: dict, log: MetricsLog | None, offset: int):
    return linear_probe(s.model.fc, feats["train"], feats.get("val"), s.rt, s.cfg, loss_fn=s.loss_fn,
                        sample_weights=s.sample_weights,
                        metrics_log=None if log is None else _PhaseLog(log, "probe", offset))


# ---------------------------------------------------------------- finetune

def finetune(source: str | Path, *, data: str | None = None, policy: str | None = None,
             recipe: str | None = None, overrides: list[str] | dict | None = None,
             model: str | None = None, config: RunConfig | None = None) -> FinetuneRun:
    """Fine-tune the weights at `source` (a run folder, a resforge checkpoint, a torchvision/timm
    ImageNet ResNet or an akamaster CIFAR ResNet) on `data` with `policy`; -> FinetuneRun.

    model names the architecture for third-party files whose keys are ambiguous (and is checked
    against resforge checkpoints). Everything else comes from the config (`finetune.*` keys)."""
    cfg = resolve_config(recipe, overrides, data=data, policy=policy, source=source, config=config)
    s = _setup(cfg, source, model)
    names = list(s.bundle.class_names)
    run_dir = new_run_dir(cfg.train.project, cfg.train.name or _run_name(s, cfg))
    _write_run_files(run_dir, cfg, s)
    _announce(s, run_dir)
    log, t_all = MetricsLog(run_dir / "metrics.csv"), time.perf_counter()
    rows, phases_done, head_seconds = _before_rows(s, log)
    model, fit_seconds = _run_phases(s, log, phases_done)
    results = _evaluate(s, model)
    total = fit_seconds + head_seconds
    trainable = max(p["trainable"] for p in phases_done) if phases_done else 0
    rows.append(comparison_row("c", f"policy {cfg.finetune.policy}", results["test"], train_seconds=total,
                               trainable_params=trainable, class_names=names, baseline=rows[0] if rows else None))
    meta = _meta(s, cfg, results, sum(p.get("epochs_run", 0) for p in phases_done))
    _save(run_dir, model, meta, rows, results, s, phases_done, time.perf_counter() - t_all)
    return FinetuneRun(run_dir, cfg, model, meta, results, rows, phases_done, total)


def _announce(s: _Setup, run_dir: Path) -> None:
    b, hw = s.bundle, s.augment.out_hw
    _say(f"resforge finetune: {s.pre.arch} ({s.pre.fmt} weights {s.pre.path}) on {b.name} "
         f"({', '.join(f'{len(sp.labels)} {k}' for k, sp in b.splits.items())}; {len(b.class_names)} classes; "
         f"input {b.channels}x{hw[0]}x{hw[1]}) policy {s.cfg.finetune.policy} on {s.rt.describe()} -> {run_dir}")
    for n in s.notes:
        _say(f"  note: {n}")


def _before_rows(s: _Setup, log: MetricsLog) -> tuple[list[dict], list[dict], float]:
    """Rows (a) prototype and (b) linear probe on features cached once; a policy whose head goes
    first starts from the probe. -> (rows, phase records, seconds the policy spent on its head)."""
    ft, names = s.cfg.finetune, list(s.bundle.class_names)
    need_probe = s.phases[0].kind == "probe"
    adapt = P.bn_to_adapt(s.model, s.phases, s.bn) if need_probe else []
    rows, probe = [], None
    if ft.compare:
        feats = _features(s)
        rows.append(_prototype_row(s, feats, names))
        own = not adapt                  # the policy starts from this probe unless its BN adapts first
        probe = _fit_probe(s, feats, log if own else None, announce=own)
        m = classification_metrics(probe_logits(probe[0], feats["test"][0]).numpy(), feats["test"][1].numpy(), names)
        rows.append(comparison_row("b", "linear probe on cached features", m, train_seconds=probe[2],
                                   trainable_params=probe[3], class_names=names, baseline=rows[0]))
        probe = probe if own else None
    if not need_probe:
        return rows, [], 0.0             # the probe was for row (b) only: not a phase of the policy
    if probe is None:
        probe = _start_probe(s, adapt, log)
    head, res, seconds, trainable, total = probe
    done = [_phase_info(s.phases[0], res, {"trainable": trainable, "total": total}, 0, seconds,
                       s.cfg.train.monitor)]
    s.model.fc.load_state_dict(head.model_fc_state())          # head first: start from the probe
    return rows, done, seconds


def _fit_probe(s: _Setup, feats: dict, log: MetricsLog | None, announce: bool = True, extra_seconds: float = 0.0):
    """-> (head, fit result, seconds incl. the train split's feature pass, trainable, total)."""
    head, res = _probe(s, feats, log, 0)
    trainable, total = sum(p.numel() for p in head.parameters()), P.count_params(s.model)
    if announce:
        _say(f"phase 'probe' (linear head on cached features, backbone frozen, BN in eval mode): trainable params "
             f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%) in {s.pre.arch}; {res.train_seconds:.1f}s")
    return head, res, res.train_seconds + feats["seconds"] + extra_seconds, trainable, total


def _start_probe(s: _Setup, bns: list[nn.Module], log: MetricsLog | None):
    """The policy's starting head. When the policy trains BN layers, their statistics are first
    re-estimated on the training images (AdaBN, no weight changes) and the head is fitted on the
    features of that network: rows (a) and (b) describe the backbone as it came, this head the start."""
    t0 = time.perf_counter()
    if bns:
        b = make_batches(s.bundle, "train", s.rt.device, s.cfg.train.eval_batch_size, train=False,
                         workers=s.cfg.data.workers)
        reestimate_bn(s.model, bns, b, s.augment, s.rt)
        _say(f"BN statistics of {len(bns)} layers the policy trains re-estimated on the training images "
             f"(AdaBN) in {time.perf_counter() - t0:.1f}s; the policy's head is fitted on those features")
    adapt_seconds = time.perf_counter() - t0
    return _fit_probe(s, _features(s, ("train", "val")), log, extra_seconds=adapt_seconds)


def _run_phases(s: _Setup, log: MetricsLog, done: list[dict]) -> tuple[nn.Module, float]:
    """Each fit phase: configure the model, call the loop, prove the frozen part did not move."""
    model, lora, seconds = s.model, None, 0.0
    offset = sum(p.get("epochs_run", 0) for p in done)
    arch = s.pre.arch
    for i, ph in enumerate(p for p in s.phases if p.kind == "fit"):
        if ph.params == "lora" and lora is None:
            lora = P.add_lora(model, s.cfg.finetune)
        counts = P.apply_phase(model, ph, s.bn, s.keep_stats)
        _say(P.describe(ph, counts, arch))
        snapshot = P.frozen_snapshot(model)
        train_cfg = dataclasses.replace(s.cfg.train, epochs=ph.epochs, seed=s.cfg.train.seed + 1000 * (i + 1))
        result = fit(model, s.train_batches, s.val_batches, s.augment, s.rt, s.cfg.optim, train_cfg,
                     lr_scale=ph.lr_scale, loss_fn=s.loss_fn, metrics_log=_PhaseLog(log, ph.name, offset),
                     desc=f"[{ph.name}] ")
        model = result.model                              # the EMA copy when train.ema is set
        moved = P.changed(model, snapshot)
        if moved:
            raise RuntimeError(f"phase '{ph.name}' changed {len(moved)} tensors it should have kept "
                               f"frozen (e.g. {moved[0]}): this is a bug in resforge, please report it")
        offset += result.state.epoch
        seconds += result.train_seconds
        done.append(_phase_info(ph, result, counts, len(snapshot), result.train_seconds, train_cfg.monitor))
    if lora is not None:
        lora.model = model
        model = lora.merge_and_unload()                   # plain weights again: a normal checkpoint
    P.release(model)
    return model.eval(), seconds


def _phase_info(ph, result, counts: dict, frozen_checked: int, seconds: float, monitor: str) -> dict:
    return {"name": ph.name, "kind": ph.kind, "stages": list(ph.stages), "params": ph.params,
            "epochs": ph.epochs, "epochs_run": result.state.epoch, "best_epoch": result.state.best_epoch,
            "monitor": monitor, "best": result.state.best,
            "trainable": counts["trainable"], "total": counts.get("total"),
            "frozen_checked": frozen_checked, "seconds": round(seconds, 3),
            "lr_scale": {k: round(v, 6) for k, v in ph.lr_scale.items()}}


def _evaluate(s: _Setup, model: nn.Module) -> dict:
    from resforge.api import evaluate_bundle
    splits = list(dict.fromkeys([*s.cfg.eval.splits, "test"]))
    return evaluate_bundle(model, s.bundle, s.augment, s.rt, splits, s.cfg.eval.tta,
                           s.cfg.train.eval_batch_size, s.cfg.data.workers)


def _run_name(s: _Setup, cfg: RunConfig) -> str:
    return f"ft-{s.pre.arch}-{s.bundle.name}-{re.sub(r'[^A-Za-z0-9]+', '-', cfg.finetune.policy)}"


def _write_run_files(run_dir: Path, cfg: RunConfig, s: _Setup) -> None:
    from resforge.api import _write_run_files as write
    cfg.model.name = s.pre.arch                        # the record names the network actually used
    if is_main_process():
        write(run_dir, cfg, s.manifest, s.bundle)


def _meta(s: _Setup, cfg: RunConfig, results: dict, epochs: int) -> dict:
    names = list(s.bundle.class_names)
    return {"model": {"name": s.pre.arch, "num_classes": len(names), "in_chans": s.bundle.channels,
                      "kwargs": s.kwargs},
            "class_names": names, "input_size": [s.bundle.channels, *s.augment.out_hw],
            "mean": s.mean, "std": s.std, "config": cfg.to_dict(), "split_hash": s.manifest["hash"],
            "data": {"source": s.bundle.name, "fingerprint": s.bundle.fingerprint},
            "finetune": {"source": str(s.pre.path), "source_format": s.pre.fmt, "policy": cfg.finetune.policy},
            "epoch": epochs, "metrics": {f"{k}_top1": v["top1"] for k, v in results.items()}}


def _save(run_dir: Path, model, meta: dict, rows: list[dict], results: dict, s: _Setup,
          phases: list[dict], wall: float) -> None:
    from resforge.checkpoint import save_checkpoint
    from resforge.plots import plot_training_curves
    if not is_main_process():
        return
    save_checkpoint(run_dir / "weights" / "best", model, meta)
    extra = {"split_hash": meta["split_hash"], "wall_seconds": round(wall, 2),
             "data": {**meta["data"], "splits": {k: int(len(sp.labels)) for k, sp in s.bundle.splits.items()}},
             "finetune": {"policy": s.cfg.finetune.policy, "source": str(s.pre.path), "arch": s.pre.arch,
                          "source_format": s.pre.fmt, "bn": s.cfg.finetune.bn,
                          "bn_kept_stats": sorted(s.keep_stats), "phases": phases,
                          "input_size": list(s.augment.out_hw), "notes": s.notes}}
    md = write_finetune_report(run_dir, rows, results, meta=meta, extra=extra)
    if (run_dir / "metrics.csv").is_file():
        plot_training_curves(run_dir / "metrics.csv", run_dir / "results.png")
    _say(format_rows(rows))
    _say(f"report: {md}\nweights: {run_dir / 'weights' / 'best.safetensors'}")


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'row':<4} {'method':<48} {'top-1':>7} {'macro-F1':>9} {'ECE':>7} {'AUC':>7} {'time s':>8} {'trainable':>12}"]
    for r in rows:
        auc = f"{r['auc']:.4f}" if r.get("auc") is not None else "-"
        lines.append(f"({r['key']})  {r['method'][:48]:<48} {r['top1']:>7.4f} {r['macro_f1']:>9.4f} {r['ece']:>7.4f} "
                     f"{auc:>7} {r['train_seconds']:>8.1f} {r['trainable_params']:>12,}")
    return "\n".join(lines)


# ---------------------------------------------------------------- lr-find

def lr_find(source: str | Path | None = None, *, data: str | None = None, policy: str | None = None,
            recipe: str | None = None, overrides: list[str] | dict | None = None, model: str | None = None,
            start: float = 1e-6, end: float = 1.0, steps: int = 100, out: str | Path | None = None,
            config: RunConfig | None = None) -> dict:
    """Learning-rate range test for the setup a `finetune` (source given) or `train` (no source:
    the recipe's model) run would use; writes lr_find.png and lr_find.json. -> the result dict
    with "suggested" (a value for optim.lr)."""
    cfg = resolve_config(recipe, overrides, data=data, policy=policy, source=source, config=config)
    if source is None:
        net, batches, augment, rt, lr_scale, loss_fn, optim, what = _scratch_target(cfg)
    else:
        net, batches, augment, rt, lr_scale, loss_fn, optim, what = _finetune_target(cfg, source, model)
    res = lr_range_test(net, batches, augment, rt, optim, loss_fn, lr_scale=lr_scale, start=start, end=end,
                        steps=steps, seed=cfg.train.seed)
    out_dir = Path(out) if out else new_run_dir(cfg.train.project, cfg.train.name or "lr-find")
    out_dir.mkdir(parents=True, exist_ok=True)
    res["target"] = what
    res["plot"] = str(plot_lr_find(res, out_dir / "lr_find.png", f"lr range test: {what}"))
    (out_dir / "lr_find.json").write_text(json.dumps(res, indent=2))
    key = "finetune.probe_lr" if what.endswith("(linear probe)") else "optim.lr"
    _say(f"lr-find ({what}): loss minimum at {res['min_loss_lr']:.3g}; suggested {key}={res['suggested']:.3g}"
         f"\nplot: {res['plot']}")
    return res


def _scratch_target(cfg: RunConfig):
    from resforge.api import build_model, channel_stats, prepare_data
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rt = make_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last)
    bundle, _ = prepare_data(cfg)
    net, _, pre = build_model(cfg, len(bundle.class_names), bundle.channels)
    mean, std = (pre["mean"], pre["std"]) if pre.get("mean") else channel_stats(bundle)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), bundle.image_size, seed=cfg.train.seed)
    tb = make_batches(bundle, "train", rt.device, cfg.train.batch_size, train=True, workers=cfg.data.workers)
    return (net.to(rt.device), tb, augment, rt, None, soft_cross_entropy(cfg.optim.label_smoothing), cfg.optim,
            f"{cfg.model.name} from scratch")


def _finetune_target(cfg: RunConfig, source, model_name):
    """The main (last) phase of the policy, after its probe phase when it has one."""
    s = _setup(cfg, source, model_name)
    last = s.phases[-1]
    if s.phases[0].kind == "probe":
        if last.kind == "probe":                        # linear-probe: the range test is the probe's
            feats = _features(s, ("train",))
            o, _ = probe_configs(cfg.optim, cfg.train, 1, cfg.finetune.probe_lr, cfg.finetune.probe_weight_decay)
            head = probe_head(s.model.fc, *feats["train"], cfg).to(s.rt.device)
            fb = FeatureBatches(*feats["train"], min(cfg.train.batch_size, len(feats["train"][1])), shuffle=True,
                                sample_weights=s.sample_weights, device=s.rt.device)
            return head, fb, IdentityAugment(), s.rt, None, s.loss_fn, o, f"{s.pre.arch} {cfg.finetune.policy} (linear probe)"
        adapt = P.bn_to_adapt(s.model, s.phases, s.bn)
        head = _start_probe(s, adapt, None)[0]         # as finetune() does: the head fits the start
        s.model.fc.load_state_dict(head.model_fc_state())
    if last.params == "lora":
        P.add_lora(s.model, cfg.finetune)
    P.apply_phase(s.model, last, s.bn, s.keep_stats)
    return (s.model, s.train_batches, s.augment, s.rt, last.lr_scale, s.loss_fn, cfg.optim,
            f"{s.pre.arch} {cfg.finetune.policy}, phase '{last.name}'")

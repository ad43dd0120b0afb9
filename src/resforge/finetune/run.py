"""`finetune`: the API behind `resforge finetune` (setup.py holds what it shares with lr-find).

finetune: load pretrained weights into a network with a head for the new classes, cache the
frozen backbone's features once, score (a) a prototype head and (b) a linear probe on them,
then run the policy's phases, each one call of the training loop, and write the run folder
(weights, config, splits, metrics.csv, results.png) and the before/after report.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from resforge import distributed as D
from resforge import ood
from resforge.config import RunConfig
from resforge.finetune import policies as P
from resforge.finetune.probe import PrototypeHead, probe_logits
from resforge.finetune.report import comparison_row, write_finetune_report
from resforge.finetune.setup import (PhaseLog, Setup, adapt_bn, build_setup, cached_features, fit_probe,
                                     resolve_config, say)
from resforge.metrics import classification_metrics
from resforge.pipeline import evaluate_bundle, split_counts, write_run_files
from resforge.runs import MetricsLog, is_main_process, new_run_dir
from resforge.training.loop import DivergedError, fit


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


# ---------------------------------------------------------------- features, prototype, probe


def _prototype_row(s: Setup, feats: dict, names: list[str], adapt_seconds: float = 0.0) -> dict:
    t0 = time.perf_counter()
    head = PrototypeHead(*feats["train"], len(names))
    head.fit_scale(*(feats.get("val") or feats["train"]))
    seconds = time.perf_counter() - t0 + feats["seconds"] + adapt_seconds
    m = classification_metrics(head.logits(feats["test"][0]).numpy(), feats["test"][1].numpy(), names)
    method = ("prototype head (class means), AdaBN, no training" if adapt_seconds
              else "prototype head (nearest class mean), no training")
    return comparison_row("a", method, m, train_seconds=seconds,
                          trainable_params=0, class_names=names, scale=head.scale)


# ---------------------------------------------------------------- finetune

def finetune(source: str | Path, *, data: str | None = None, policy: str | None = None,
             recipe: str | None = None, overrides: list[str] | dict | None = None,
             model: str | None = None, config: RunConfig | None = None) -> FinetuneRun:
    """Fine-tune the weights at `source` (a run folder, a resforge checkpoint, a torchvision/timm
    ImageNet ResNet or an akamaster CIFAR ResNet) on `data` with `policy`; -> FinetuneRun.

    model names the architecture for third-party files whose keys are ambiguous (and is checked
    against resforge checkpoints). Everything else comes from the config (`finetune.*` keys)."""
    cfg = resolve_config(recipe, overrides, data=data, policy=policy, source=source, config=config)
    s = build_setup(cfg, source, model)
    names = list(s.bundle.class_names)
    run_dir = D.broadcast_object(new_run_dir(cfg.train.project, cfg.train.name or _run_name(s, cfg))
                                 if is_main_process() else None)          # rank 0 creates it
    _write_run_files(run_dir, cfg, s)
    _announce(s, run_dir)
    log, t_all = MetricsLog(run_dir / "metrics.csv"), time.perf_counter()
    rows, phases_done, head_seconds, compare_seconds = _before_rows(s, log)
    model, fit_seconds = _run_phases(s, log, phases_done)
    kept = {}                                     # split -> plain logits, for the OOD threshold
    results = _evaluate(s, model, kept)
    total = fit_seconds + head_seconds
    trainable = max(p["trainable"] for p in phases_done) if phases_done else 0
    rows.append(comparison_row("c", f"policy {cfg.finetune.policy}", results["test"], train_seconds=total,
                               trainable_params=trainable, class_names=names, baseline=rows[0] if rows else None))
    meta = _meta(s, cfg, results, sum(p.get("epochs_run", 0) for p in phases_done))
    record = ood.fit_on_val(kept, cfg.eval.ood_score, cfg.eval.ood_accept_rate)   # saved with the weights
    meta |= {"ood": record} if ood.fitted(record) else {}
    _save(run_dir, model, meta, rows, results, s, phases_done, time.perf_counter() - t_all, compare_seconds,
          ood_summary=ood.summary(record, kept))
    D.barrier()                                   # no process ends the job before rank 0 has written
    return FinetuneRun(run_dir, cfg, model, meta, results, rows, phases_done, total)


def _announce(s: Setup, run_dir: Path) -> None:
    b, hw = s.bundle, s.augment.out_hw
    say(f"resforge finetune: {s.pre.arch} ({s.pre.fmt} weights {s.pre.path}) on {b.name} "
         f"({', '.join(f'{len(sp.labels)} {k}' for k, sp in b.splits.items())}; {len(b.class_names)} classes; "
         f"input {b.channels}x{hw[0]}x{hw[1]}) policy {s.cfg.finetune.policy} on {s.rt.describe()} -> {run_dir}")
    for n in s.notes:
        say(f"  note: {n}")


def _before_rows(s: Setup, log: MetricsLog) -> tuple[list[dict], list[dict], float, float]:
    """Rows (a) prototype and (b) linear probe, and the head a probe-first policy starts from, all
    on ONE feature pass per split. -> (rows, phase records, seconds the policy spent on its head,
    seconds spent only for rows (a) and (b)).

    When the policy trains BN layers, their statistics are re-estimated first (AdaBN) and the
    features extracted once after it. That is still a fair "before" for rows (a) and (b): AdaBN
    changes no weight and sees only the unlabelled training images (never val or test), so both
    rows remain "no backbone training"; and they now describe exactly the network the policy
    starts from, so row (b) *is* the policy's probe phase instead of a second probe fitted on
    features of a network the policy never trains. Before, rows (a)/(b) had their own pass on the
    un-adapted backbone and the probe a second train+val pass: three passes over the training
    images before training, now two (AdaBN needs its own: the features depend on the statistics
    it ends with)."""
    ft, names = s.cfg.finetune, list(s.bundle.class_names)
    need_probe = s.phases[0].kind == "probe"
    if not (ft.compare or need_probe):
        return [], [], 0.0, 0.0
    adapt_seconds = adapt_bn(s, P.bn_to_adapt(s.model, s.phases, s.bn) if need_probe else [])
    t_rows = time.perf_counter()
    feats = cached_features(s, ("train", "val", "test") if ft.compare else ("train", "val"))
    rows, compare_seconds = [], feats["seconds_by_split"].get("test", 0.0)
    # announced and logged (phase "probe" in metrics.csv) as before, also when it is row (b)'s only
    probe = fit_probe(s, feats, log, extra_seconds=adapt_seconds)
    if ft.compare:
        t0 = time.perf_counter()
        rows.append(_prototype_row(s, feats, names, adapt_seconds))
        m = classification_metrics(probe_logits(probe[0], feats["test"][0]).numpy(), feats["test"][1].numpy(), names)
        method = "linear probe on cached features" + (" (AdaBN)" if adapt_seconds else "")
        rows.append(comparison_row("b", method, m, train_seconds=probe[2],
                                   trainable_params=probe[3], class_names=names, baseline=rows[0]))
        compare_seconds += time.perf_counter() - t0
    if not need_probe:                   # the probe and its features were for row (b) only
        return rows, [], 0.0, time.perf_counter() - t_rows
    head, res, seconds, trainable, total = probe
    done = [_phase_info(s.phases[0], res, {"trainable": trainable, "total": total}, 0, seconds,
                       s.cfg.train.monitor)]
    s.model.fc.load_state_dict(head.model_fc_state())          # head first: start from the probe
    return rows, done, seconds, compare_seconds


def _run_phases(s: Setup, log: MetricsLog, done: list[dict]) -> tuple[nn.Module, float]:
    """Each fit phase: configure the model, call the loop, prove the frozen part did not move."""
    model, lora, seconds = s.model, None, 0.0
    offset = sum(p.get("epochs_run", 0) for p in done)
    arch = s.pre.arch
    for i, ph in enumerate(p for p in s.phases if p.kind == "fit"):
        if ph.params == "lora" and lora is None:
            lora = P.add_lora(model, s.cfg.finetune)
        counts = P.apply_phase(model, ph, s.bn)
        say(P.describe(ph, counts, arch))
        snapshot = P.frozen_snapshot(model)
        train_cfg = dataclasses.replace(s.cfg.train, epochs=ph.epochs, seed=s.cfg.train.seed + 1000 * (i + 1))
        before, t0 = copy.deepcopy(model.state_dict()), time.perf_counter()
        try:
            result = fit(model, s.train_batches, s.val_batches, s.augment, s.rt, s.cfg.optim, train_cfg,
                         lr_scale=ph.lr_scale, loss_fn=s.loss_fn, metrics_log=PhaseLog(log, ph.name, offset),
                         desc=f"[{ph.name}] ")
        except DivergedError as e:                        # nothing validated in this phase: undo it
            model.load_state_dict(before)
            s.notes.append(f"{e}. Phase '{ph.name}' was undone (weights as before it) and the phases after it "
                           "skipped: the final model is the one the earlier phases left")
            say(s.notes[-1])
            done.append(_phase_info(ph, None, counts, 0, time.perf_counter() - t0, train_cfg.monitor))
            break
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
    """One phase's record; result None: the phase diverged and was undone."""
    state = result.state if result is not None else None
    return {"name": ph.name, "kind": ph.kind, "stages": list(ph.stages), "params": ph.params,
            "epochs": ph.epochs, "epochs_run": state.epoch if state else 0, "diverged": state is None,
            "best_epoch": state.best_epoch if state else 0, "monitor": monitor, "best": state.best if state else None,
            "trainable": counts["trainable"], "total": counts.get("total"),
            "frozen_checked": frozen_checked, "seconds": round(seconds, 3),
            "lr_scale": {k: round(v, 6) for k, v in ph.lr_scale.items()}}


def _evaluate(s: Setup, model: nn.Module, kept: dict) -> dict:
    splits = list(dict.fromkeys([*s.cfg.eval.splits, "test"]))
    return evaluate_bundle(model, s.bundle, s.augment, s.rt, splits, s.cfg.eval.tta,
                           s.cfg.train.eval_batch_size, s.cfg.data.workers, keep_logits=kept)


def _run_name(s: Setup, cfg: RunConfig) -> str:
    return f"ft-{s.pre.arch}-{s.bundle.name}-{re.sub(r'[^A-Za-z0-9]+', '-', cfg.finetune.policy)}"


def _write_run_files(run_dir: Path, cfg: RunConfig, s: Setup) -> None:
    cfg.model.name = s.pre.arch                        # the record names the network actually used
    if is_main_process():
        write_run_files(run_dir, cfg, s.manifest, s.bundle)


def _meta(s: Setup, cfg: RunConfig, results: dict, epochs: int) -> dict:
    names = list(s.bundle.class_names)
    return {"model": {"name": s.pre.arch, "num_classes": len(names), "in_chans": s.bundle.channels,
                      "kwargs": s.kwargs},
            "class_names": names, "input_size": [s.bundle.channels, *s.augment.out_hw],
            "mean": s.mean, "std": s.std, "config": cfg.to_dict(), "split_hash": s.manifest["hash"],
            "data": {"source": s.bundle.name, "fingerprint": s.bundle.fingerprint},
            "finetune": {"source": str(s.pre.path), "source_format": s.pre.fmt, "policy": cfg.finetune.policy},
            "epoch": epochs, "metrics": {f"{k}_top1": v["top1"] for k, v in results.items()}}


def _save(run_dir: Path, model, meta: dict, rows: list[dict], results: dict, s: Setup,
          phases: list[dict], wall: float, compare_seconds: float = 0.0, ood_summary: dict | None = None) -> None:
    from resforge.checkpoint import save_checkpoint
    from resforge.plots import plot_training_curves
    if not is_main_process():
        return
    save_checkpoint(run_dir / "weights" / "best", model, meta)
    extra = {"split_hash": meta["split_hash"], "wall_seconds": round(wall, 2),
             "data": {**meta["data"], "splits": split_counts(s.bundle)},
             "finetune": {"policy": s.cfg.finetune.policy, "source": str(s.pre.path), "arch": s.pre.arch,
                          "source_format": s.pre.fmt, "bn": s.cfg.finetune.bn,
                          "bn_resolved": s.bn, "phases": phases, "compare": s.cfg.finetune.compare,
                          "comparison_seconds": round(compare_seconds, 3),
                          "input_size": list(s.augment.out_hw), "notes": s.notes}}
    if ood_summary is not None:
        extra["ood"] = ood_summary
    from resforge.training.health import diagnose, format_warnings, history_from_csv
    extra["warnings"] = diagnose(history_from_csv(run_dir / "metrics.csv"), len(s.bundle.class_names), results,
                                 data=s.cfg.data.source, lr=s.cfg.optim.lr)
    if extra["warnings"]:
        say(format_warnings(extra["warnings"]))
    md = write_finetune_report(run_dir, rows, results, meta=meta, extra=extra)
    if (run_dir / "metrics.csv").is_file():
        plot_training_curves(run_dir / "metrics.csv", run_dir / "results.png")
    say(format_rows(rows))
    say(f"report: {md}\nweights: {run_dir / 'weights' / 'best.safetensors'}")


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'row':<4} {'method':<48} {'top-1':>7} {'macro-F1':>9} {'ECE':>7} {'AUC':>7} {'time s':>8} {'trainable':>12}"]
    for r in rows:
        auc = f"{r['auc']:.4f}" if r.get("auc") is not None else "-"
        lines.append(f"({r['key']})  {r['method'][:48]:<48} {r['top1']:>7.4f} {r['macro_f1']:>9.4f} {r['ece']:>7.4f} "
                     f"{auc:>7} {r['train_seconds']:>8.1f} {r['trainable_params']:>12,}")
    return "\n".join(lines)



"""`resforge bench`: this machine's limit, a recipe's compute floor, and where a run's time went.

    from resforge.bench import bench, format_bench
    result = bench("cifar10-fast", ["data.source=/data/cifar-10-binary.tar.xz"], seconds=3)
    result = bench("runs/airbench94-cifar10")           # a finished run: + wall time / floors
    print(format_bench(result))

One call measures, on the threads, precision and memory layout a run of the recipe would use
(training/device.py; fp32 + channels_last on a CPU without native bf16):

    peak       sustained square-matmul FLOP/s (bf16 autocast too, only where native), and every
               distinct conv layer of the recipe's model at its batch and input size, timed
               alone (peak.py); the machine's peak is the fastest of them
    steps      the model's bare training step on a synthetic in-memory batch (the floor) and
               resforge's real step on the recipe's data, interleaved (steps.py)
    work       the recipe's (or run's) FLOPs and images (work.py, FLOPs by resforge.flops)
    floors     ideal (FLOPs / peak), conv (FLOPs / the model's conv rate), bare (the bare step
               x the images), in seconds of the timed training
    breakdown  the PyTorch profiler on a few real steps, scaled to the run (breakdown.py)

For a finished run it adds its real training wall time divided by each floor. Times are the
machine's as it is: other processes on the cores slow everything, so the load average is
recorded before and after.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch

from resforge.atomic import atomic_write_text
from resforge.bench.breakdown import profile_steps, run_fractions
from resforge.bench.peak import MATMUL_SIZES, conv_rates, matmul_peak
from resforge.bench.steps import BareEval, BareStep, PipelineStep, steps_for
from resforge.bench.work import floors, read_report, recipe_work, run_work
from resforge.config import RunConfig, load_config
from resforge.data import load_manifest
from resforge.data.augment import Augmenter
from resforge.flops import count_flops
from resforge.pipeline import (build_model, normalisation, place_model, prepare_data, split_counts, start_runtime,
                               train_batches, val_batches)
from resforge.runs import say as _say
from resforge.training.device import cpu_has_native_bf16, make_runtime
from resforge.training.probes import train_eval_batches

__all__ = ["bench", "format_bench", "pipeline_overhead", "resolve_target", "setup"]


def resolve_target(target: str | Path | None, overrides=()) -> tuple[RunConfig, Path | None, dict | None]:
    """(config, run folder or None, report.json or None) of a recipe name/path or a run folder;
    no target: the digits recipe (as `resforge train`)."""
    text = str(target) if target is not None else "digits"
    path = Path(text)
    looks_like_run = path.is_dir() or (os.sep in text and path.suffix not in (".yaml", ".yml"))
    if not looks_like_run:
        return load_config(text, list(overrides)), None, None
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} not found: pass the folder `resforge train` printed "
                                "(e.g. runs/resnet20-digits) or a recipe name (see `resforge recipes`)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: {path} is not a resforge run folder; pass the "
                                "folder `resforge train` printed, or a recipe name (see `resforge recipes`)")
    report = read_report(path)
    saved = json.loads((path / "config.json").read_text())
    return load_config(None, list(overrides), base=saved), path, report


def setup(cfg: RunConfig, run_dir: Path | None = None):
    """(runtime, data bundle, model on the device, augmenter) as `resforge train` builds them
    (pipeline.py), on a run's own splits when run_dir is given. The model keeps its fresh
    initialisation: neither weights nor data-dependent init change what a step costs."""
    rt = start_runtime(cfg)
    manifest = load_manifest(run_dir / "splits.json") if run_dir and (run_dir / "splits.json").is_file() else None
    bundle, _ = prepare_data(cfg, manifest)
    model, _, pre = build_model(cfg, len(bundle.class_names), bundle.channels)
    mean, std = normalisation(pre, bundle)
    augment = Augmenter(cfg.aug, mean, std, len(bundle.class_names), bundle.image_size, seed=cfg.train.seed)
    return rt, bundle, place_model(model, rt), augment


def pipeline_overhead(recipe: str, overrides=(), *, seconds: float = 3.0, rounds: int = 4) -> dict:
    """resforge's real training step against the bare one for a recipe's network, interleaved
    in this process (see _interleave). -> {"bare", "resforge": {"images_per_s", ...},
    "pipeline_overhead": resforge seconds per image / bare, "model", "batch_size", "input_size",
    "runtime", "load"}"""
    cfg = load_config(recipe, list(overrides))
    rt, bundle, model, augment = setup(cfg)
    shape = (bundle.channels, *augment.out_hw)
    bare = BareStep(model, cfg, rt, shape, len(bundle.class_names))
    pipe = PipelineStep(model, cfg, rt, train_batches(cfg, bundle, rt), augment)
    out = _interleave(bare, pipe, seconds, rounds)
    return {**out, "model": cfg.model.name, "batch_size": cfg.train.batch_size, "input_size": list(shape),
            "runtime": rt.describe(), "load": _load()}


def bench(target: str | Path | None = None, overrides=(), *, seconds: float = 3.0, steps: int = 2,
          rounds: int = 4, profile: bool = True, json_out: str | Path | None = None,
          matmul_sizes=MATMUL_SIZES, say=_say) -> dict:
    """Measure the limit and floors for a recipe (name or YAML path) or a finished run folder.

    overrides: key=value items applied to the recipe (or to the run's saved config), e.g.
    data.source=PATH or train.threads=1. seconds: wall time of each measurement (matmul sizes
    together, conv shapes together, each step kind per round); steps: real training steps
    profiled for the breakdown (0 or profile=False: none); rounds: at most this many bare/resforge
    alternations (see _interleave); matmul_sizes: the square sizes timed for the peak.
    -> a JSON-ready dict (see format_bench); also written to json_out when given."""
    cfg, run_dir, report = resolve_target(target, overrides)
    load_before = _load()
    rt, bundle, model, augment = setup(cfg, run_dir)
    classes, shape = len(bundle.class_names), (bundle.channels, *augment.out_hw)
    flops = count_flops(model, shape)
    tta_views = len(augment.tta_view_names())
    work = run_work(run_dir, cfg, report, flops, tta_views) if run_dir else \
        recipe_work(cfg, flops, split_counts(bundle), tta_views)
    say(f"bench: {cfg.model.name} at batch {cfg.train.batch_size}, {'x'.join(map(str, shape))} on {rt.describe()}; "
        f"{_load_text(load_before)}")

    peaks = {rt.precision: matmul_peak(rt, seconds, matmul_sizes)}
    if rt.precision != "fp32":                 # the fp32 rate too, for reference
        fp32 = make_runtime(str(rt.device), "fp32", rt.channels_last, rt.threads)
        peaks["fp32"] = matmul_peak(fp32, seconds, matmul_sizes)
    convs = conv_rates(model, shape, cfg.train.batch_size, rt, seconds)
    peak, peak_from = _peak(peaks[rt.precision], convs, rt.precision)
    say(f"bench: peak {peak / 1e9:.1f} GFLOP/s ({peak_from}); timing the bare and resforge steps")

    bare = BareStep(model, cfg, rt, shape, classes)
    pipe = PipelineStep(model, cfg, rt, train_batches(cfg, bundle, rt), augment)
    step_rates = _interleave(bare, pipe, seconds, rounds)
    ev = BareEval(model, cfg, rt, shape)
    n_eval = steps_for(seconds / 2, ev.run(1), at_least=1)           # after one untimed warm-up call
    eval_s = ev.run(n_eval) / (n_eval * ev.batch)                     # seconds per evaluated image

    fl = floors(work, peak, convs["flops_per_s"], step_rates["bare"]["seconds_per_image"], eval_s,
                flops["inference"])
    result = {
        "target": {"kind": "run" if run_dir else "recipe", "name": str(run_dir) if run_dir else cfg.recipe},
        "machine": _machine(load_before),
        "runtime": {"device": str(rt.device), "precision": rt.precision, "channels_last": rt.channels_last,
                    "threads": rt.threads or torch.get_num_threads()},
        "model": {"name": cfg.model.name, "input_size": list(shape), "batch_size": cfg.train.batch_size,
                  "eval_batch_size": ev.batch, "flops": flops},
        "peak": {"flops_per_s": peak, "from": peak_from, "matmul": peaks},
        "convs": convs,
        "steps": {**step_rates, "bare_eval": {"seconds_per_image": eval_s, "images_per_s": 1 / eval_s}},
        "work": work.as_dict(),
        "floors": fl,
    }
    if work.train_seconds:
        result["run"] = {"train_seconds": work.train_seconds,
                         **{f"ratio_to_{k}": work.train_seconds / v for k, v in fl.items()
                            if v and k in ("ideal", "conv", "bare")}}
    if profile and steps > 0:
        say(f"bench: profiling {steps} real training steps")
        evals = _eval_batches(cfg, bundle, rt) if work.eval_images else None
        profiled = profile_steps(pipe, steps, evals)
        result["breakdown"] = {**run_fractions(profiled, work.steps, work.eval_images), "profiled": profiled}
    result["machine"]["load_after"] = _load()
    if json_out is not None:
        atomic_write_text(Path(json_out), json.dumps(result, indent=2, default=str))
    return result


def _interleave(bare: BareStep, pipe: PipelineStep, seconds: float, rounds: int) -> dict:
    """Bare and resforge steps alternated (A B B A ...) after one untimed warm-up step each,
    about `seconds` of steps per kind in all: up to `rounds` rounds, fewer (but 2) when a step
    is long (a 10-s step is a rate on its own; short ones need several rounds on a busy CPU).
    -> per kind: mean seconds per image over the rounds; "pipeline_overhead": the median
    round's resforge / bare ratio."""
    warm = {"bare": bare.run(1), "resforge": pipe.run(1)}
    rounds = max(1, min(rounds, max(2, int(seconds // max(warm.values())))))
    n = {k: steps_for(seconds / rounds, v, at_least=1) for k, v in warm.items()}
    times = {"bare": [], "resforge": []}
    for r in range(rounds):
        for kind in (("bare", "resforge") if r % 2 == 0 else ("resforge", "bare")):
            step = bare if kind == "bare" else pipe
            times[kind].append(step.run(n[kind]) / (n[kind] * step.batch))     # seconds per image
    out = {}
    for kind, per_image in times.items():
        s = statistics.fmean(per_image)
        out[kind] = {"seconds_per_image": s, "images_per_s": 1 / s, "steps_per_round": n[kind],
                     "rounds": len(per_image)}
    out["pipeline_overhead"] = statistics.median(p / b for p, b in zip(times["resforge"], times["bare"]))
    return out


def _peak(matmul: dict, convs: dict, precision: str) -> tuple[float, str]:
    """The fastest sustained rate measured: the best matmul size, or a conv shape if one beat it."""
    best_conv = max(convs["shapes"], key=lambda r: r["flops_per_s"], default=None)
    if best_conv is not None and best_conv["flops_per_s"] > matmul["flops_per_s"]:
        return best_conv["flops_per_s"], f"conv {best_conv['describe']}, {precision}"
    return matmul["flops_per_s"], f"matmul {matmul['size']}x{matmul['size']}, {precision}"


def _eval_batches(cfg: RunConfig, bundle, rt):
    vb = val_batches(cfg, bundle, rt)
    if vb is not None:
        return vb
    return train_eval_batches(bundle, cfg.train.eval_train, rt.device, cfg.train.eval_batch_size, cfg.data.workers)


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _load_text(load) -> str:
    return f"load average {' '.join(f'{x:.2f}' for x in load)} on {os.cpu_count()} cores" if load else "load unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f.startswith(("avx", "amx", "fma")))


def _machine(load) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": _cpu_flags(), "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_before": load}


def _g(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e9:.1f} GFLOP/s"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s:.0f} s ({s / 60:.1f} min)"


def format_bench(r: dict) -> str:
    """The result of bench() as the report `resforge bench` prints."""
    m, rt, w, fl, st = r["machine"], r["runtime"], r["work"], r["floors"], r["steps"]
    size = "x".join(map(str, r["model"]["input_size"]))
    lines = [f"{r['target']['kind']} {r['target']['name']}: {r['model']['name']} at batch {r['model']['batch_size']}, "
             f"{size}; {rt['device']} {rt['precision']} {'channels_last' if rt['channels_last'] else 'NCHW'}, "
             f"{rt['threads']} thread{'s' * (rt['threads'] != 1)}",
             f"machine: {m['cpu']}, {m['cores']} cores, {' '.join(m['flags']) or 'no AVX'}; native bf16: "
             f"{'yes' if m['native_bf16'] else 'no'}; torch {m['torch']}; {_load_text(m['load_before'])} "
             f"(after: {_load_text(m['load_after'])})", "",
             "peak (sustained)"]
    for prec, mm in r["peak"]["matmul"].items():
        sizes = "  ".join(f"{n}: {v / 1e9:.0f}" for n, v in mm["by_size"].items())
        lines.append(f"  matmul {prec:<5} {_g(mm['flops_per_s']):>15}   (GFLOP/s by size  {sizes})")
    lines.append(f"  machine peak {_g(r['peak']['flops_per_s']):>15}   ({r['peak']['from']})")
    lines.append(f"  the model's convs alone at batch {r['model']['batch_size']} (forward + backward):")
    for c in r["convs"]["shapes"]:
        lines.append(f"    {c['describe']:<44} x{c['count']:<3} {_g(c['flops_per_s']):>15}")
    lines.append(f"    {'all convs of one step':<49} {_g(r['convs']['flops_per_s']):>15}")
    f = r["model"]["flops"]
    lines += ["", f"step (per image: {f['train'] / 1e9:.4g} GFLOP train, {f['inference'] / 1e9:.4g} GFLOP eval)",
              f"  bare     {st['bare']['images_per_s']:9.1f} img/s = {_g(st['bare']['images_per_s'] * f['train'])}  "
              "(forward + backward + optimiser, synthetic in-memory batch)",
              f"  resforge {st['resforge']['images_per_s']:9.1f} img/s = "
              f"{_g(st['resforge']['images_per_s'] * f['train'])}  (the run's batches, augmentation, train_one_epoch)",
              f"  pipeline overhead {st['pipeline_overhead']:.3f}x the bare step;  bare eval "
              f"{st['bare_eval']['images_per_s']:.1f} img/s", "",
              f"work ({w['source']}): {w['train_images']:,} training images x {w['flops_per_train_image'] / 1e9:.4g} GFLOP"
              f" + {w['eval_images']:,} evaluated x {w['flops_per_eval_image'] / 1e9:.4g} GFLOP = "
              f"{w['train_flops']:.4g} FLOP; after training {w['final_eval_images']:,} eval views",
              f"compute floor  ideal {_dur(fl['ideal'])}   conv {_dur(fl['conv'])}   bare {_dur(fl['bare'])}"
              f"   (+ final evaluation, bare: {_dur(fl['final_eval_bare'])})"]
    if "run" in r:
        run = r["run"]
        lines.append(f"run: trained in {_dur(run['train_seconds'])} = {run.get('ratio_to_ideal', 0):.2f}x the ideal "
                     f"floor, {run.get('ratio_to_conv', 0):.2f}x the conv floor, {run.get('ratio_to_bare', 0):.2f}x "
                     "the bare floor")
    if "breakdown" in r:
        b = r["breakdown"]
        p = b["profiled"]
        lines += ["", f"where the time goes (profiler: {p['steps']} real steps"
                      f"{', %d eval images' % p['eval_images'] if p['eval_images'] else ''}; projected "
                      f"{_dur(b['projected_seconds'])} of training)"]
        lines += [f"  {k:<13} {100 * v:5.1f}%" for k, v in b["fractions"].items()]
    return "\n".join(lines)

"""He et al. 2016's degradation experiment: plainD vs resnetD twins trained with one recipe.

Deeper *plain* nets end with higher training error than shallower ones (not overfitting:
they fit the training set worse), while the residual twins, identical but for the
parameter-free option-A shortcuts, get better with depth (paper Fig. 6, Table 6).

Layout (every run is a normal run folder, resumable with `resforge train --resume`):

    runs/degradation-<name>/
        experiment.json          settings (recipe, epochs, overrides): a rerun must match them
        plain20-s0/ resnet20-s0/ plain56-s0/ ...      one run per (family, depth, seed)
        degradation.png          error curves: training (dashed) and held-out (solid) per depth
        degradation.md / .json   final train / val / test error per network (+ per seed)
        grad_norms.png           per-stage gradient norms over training, plain vs residual

Training error is `train_eval_acc` (a fixed, un-augmented 5k training subset evaluated in
eval mode each epoch, see training/probes.py); the loop's `train_acc` (augmented batches, moving
weights) is only a fallback.  Per-epoch held-out curves use the 5k validation split, never
used for model selection (`train.restore_best=false`); the official test set is evaluated
once, on the final weights.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from resforge.checkpoint import atomic_write_text
from resforge.config import load_config, parse_override, resolve_key
from resforge.models import create_model
from resforge.plots import read_metrics_csv

DEFAULT_RECIPE = "he2016-cifar10-short"
FAMILIES = ("plain", "resnet")
# He et al. 2016, Table 6 (CIFAR-10 test error, %, option A, 64k iterations)
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43}
DEFAULT_EVAL_TRAIN = 5_000


@dataclass(frozen=True)
class RunSpec:
    family: str          # "plain" | "resnet"
    depth: int           # 6n + 2
    seed: int

    @property
    def model(self) -> str:
        return f"{self.family}{self.depth}"

    @property
    def folder(self) -> str:
        return f"{self.model}-s{self.seed}"


def run_specs(depths, seeds) -> list[RunSpec]:
    """Seed-major order, so a first complete seed (all depths, both families) lands early."""
    return [RunSpec(f, d, s) for s in seeds for d in depths for f in FAMILIES]


# ---------------------------------------------------------------- twins

def weighted_layers(model: nn.Module) -> int:
    """Conv + fully connected layers: the "depth" He et al. count (6n + 2)."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def twin_check(depth: int, num_classes: int = 10) -> dict:
    """Build plainD and resnetD (on the meta device: shapes only) and check that they have the
    same layers and the same parameter list -- the shortcut is the only difference."""
    with torch.device("meta"):
        plain, res = (create_model(f"{f}{depth}", num_classes=num_classes) for f in FAMILIES)
    shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in (plain, res)]
    out = {"depth": depth, "layers": weighted_layers(res), "params": sum(p.numel() for p in res.parameters()),
           "same_layers": weighted_layers(plain) == weighted_layers(res) == depth,
           "same_parameters": shapes[0] == shapes[1]}
    if not (out["same_layers"] and out["same_parameters"]):
        raise ValueError(f"plain{depth} and resnet{depth} are not twins: {out}")
    return out


# ---------------------------------------------------------------- running

def experiment_dir(project: str | Path, name: str) -> Path:
    return Path(project) / f"degradation-{name}"


# Where the data is and how training reports itself: not part of what the experiment measures.
ENVIRONMENT_KEYS = {"data.data_root", "data.cache_dir", "data.workers", "train.progress"}


def _comparable(settings: dict) -> dict:
    keep = [o for o in settings["overrides"] if ".".join(resolve_key(parse_override(o)[0])) not in ENVIRONMENT_KEYS]
    return {**settings, "overrides": keep}


def _check_settings(exp_dir: Path, settings: dict) -> None:
    """A rerun continues the same experiment: its settings must match the first call's
    (data location and progress display aside)."""
    path = exp_dir / "experiment.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if _comparable(saved) != _comparable(settings):
            raise ValueError(f"{exp_dir} was started with {saved}, not {settings}: rerun with the same "
                             "recipe/epochs/overrides to resume it, or pass --name to start another")
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=2))


def run_overrides(spec: RunSpec, exp_dir: Path, settings: dict) -> list[str]:
    """The recipe's config for one twin: user overrides first, then what the experiment fixes."""
    out = list(settings["overrides"])
    if settings["epochs"] is not None:
        out.append(f"train.epochs={settings['epochs']}")
    base = load_config(settings["recipe"], out)
    if base.train.eval_train == 0:                      # the figure needs real training error
        out.append(f"train.eval_train={DEFAULT_EVAL_TRAIN}")
    return out + [f"model.name={spec.model}", f"train.seed={spec.seed}", "train.grad_norms=true",
                  f"train.project={exp_dir}", f"train.name={spec.folder}"]


# What a run killed while starting up can leave behind (atomic writes leave ".<name>.<pid>.tmp").
_STARTUP_FILES = {"config.yaml", "config.json", "splits.json"}


def run_state(run_dir: Path) -> str:
    """One of: finished (report.json, written last), started (resumable), stub (killed while
    starting: nothing trained), absent."""
    if (run_dir / "report.json").is_file():
        return "finished"
    if (run_dir / "config.json").is_file() and (run_dir / "splits.json").is_file():
        return "started"
    if not run_dir.is_dir():
        return "absent"
    names = {p.name for p in run_dir.iterdir()}
    if all(n in _STARTUP_FILES or n.startswith(".") for n in names):
        return "stub"
    raise ValueError(f"{run_dir} holds an unfinished run without its config.json/splits.json: "
                     "move it away and rerun to train it again")


@contextlib.contextmanager
def _claim(exp_dir: Path, spec: RunSpec):
    """An exclusive, non-blocking lock per run: several invocations of the experiment (e.g. two
    single-thread processes on a 2-core CPU, ~1.4x the throughput of one two-thread process) share
    the runs instead of training the same one twice. Yields False when another process holds it.
    The OS drops the lock when its holder dies, so a killed run is free to resume."""
    with open(exp_dir / f".{spec.folder}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_one(spec: RunSpec, exp_dir: Path, settings: dict, train_fn: Callable) -> str:
    """Train one twin, resume it, or skip it; -> "skipped" | "resumed" | "trained" | "busy"
    (another process is training it)."""
    with _claim(exp_dir, spec) as mine:
        return _run_one(spec, exp_dir, settings, train_fn) if mine else "busy"


def _run_one(spec: RunSpec, exp_dir: Path, settings: dict, train_fn: Callable) -> str:
    run_dir = exp_dir / spec.folder
    state = run_state(run_dir)
    if state == "finished":
        return "skipped"
    if state == "started":                              # continue from weights/last.state.pt
        train_fn(resume=run_dir)
        return "resumed"
    if state == "stub":                                 # same folder name again, not "<name>-2"
        for f in run_dir.iterdir():
            f.unlink()
        run_dir.rmdir()
    train_fn(settings["recipe"], run_overrides(spec, exp_dir, settings))
    return "trained"


def run_degradation(depths=(20, 56), seeds=(0,), *, recipe: str = DEFAULT_RECIPE, epochs: int | None = None,
                    overrides=(), name: str | None = None, project: str | Path = "runs", jobs: int = 1,
                    train_fn: Callable | None = None) -> dict:
    """Train (or resume) every (family, depth, seed) run, then write the figures and the table.
    jobs > 1 trains that many runs at once, in this process and jobs - 1 helper processes, with
    cores // jobs threads each (on 2 cores, 2 jobs do 1.2-1.3x the work of 1, see docs/degradation.md).
    Returns the summary also saved as degradation.json."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if train_fn is None:
        from resforge.api import train as train_fn      # late: api.degradation imports this module
    depths, seeds = sorted({int(d) for d in depths}), list(dict.fromkeys(int(s) for s in seeds))
    exp_dir = experiment_dir(project, name or Path(recipe).stem)
    settings = {"recipe": recipe, "epochs": epochs, "overrides": list(overrides)}
    twins = [twin_check(d) for d in depths]
    _check_settings(exp_dir, settings)
    specs, threads = run_specs(depths, seeds), torch.get_num_threads()
    try:
        helpers = _start_helpers(jobs - 1, specs, exp_dir, settings)
        _work(specs, exp_dir, settings, train_fn)
        _join(helpers)
    finally:
        torch.set_num_threads(threads)
    return _report(exp_dir, depths, seeds, twins, settings)


def report_degradation(depths=(20, 56), seeds=(0,), *, recipe: str = DEFAULT_RECIPE, epochs: int | None = None,
                       overrides=(), name: str | None = None, project: str | Path = "runs") -> dict:
    """Write the figures and the table from the runs as they stand, training nothing: finished
    runs fill the table, unfinished ones are drawn up to their last epoch and listed as in progress
    (a multi-hour experiment can be looked at while it trains). Same arguments as run_degradation."""
    depths, seeds = sorted({int(d) for d in depths}), list(dict.fromkeys(int(s) for s in seeds))
    exp_dir = experiment_dir(project, name or Path(recipe).stem)
    if not (exp_dir / "experiment.json").is_file():
        raise FileNotFoundError(f"{exp_dir} holds no experiment (no experiment.json): run it first, or pass the "
                                "--project/--name/--recipe it was started with")
    settings = {"recipe": recipe, "epochs": epochs, "overrides": list(overrides)}
    _check_settings(exp_dir, settings)
    return _report(exp_dir, depths, seeds, [twin_check(d) for d in depths], settings)


def _report(exp_dir: Path, depths, seeds, twins, settings) -> dict:
    unfinished = [s.folder for s in run_specs(depths, seeds) if run_state(exp_dir / s.folder) != "finished"]
    if unfinished:
        print(f"degradation: {', '.join(unfinished)} not finished; the table covers the finished runs, the figure "
              "draws the others up to their last epoch: rerun the same command to finish them", flush=True)
    summary = summarise(exp_dir, depths, seeds, twins, settings)
    write_outputs(exp_dir, summary)
    return summary


def _work(specs, exp_dir: Path, settings: dict, train_fn: Callable) -> None:
    for spec in specs:
        status = run_one(spec, exp_dir, settings, train_fn)
        print(f"degradation: {spec.folder} {status}", flush=True)


def _threads_per_job(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _start_helpers(n: int, specs, exp_dir: Path, settings: dict) -> list:
    """n helper processes (spawned: no forked torch/OpenMP state) working through the same runs;
    each run is claimed by one process (_claim). This process drops to its share of the cores."""
    if n < 1:
        return []
    threads = _threads_per_job(n + 1)
    torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("spawn")
    quiet = {**settings, "overrides": [*settings["overrides"], "train.progress=false"]}   # one set of bars
    procs = [ctx.Process(target=_helper, args=(specs, exp_dir, quiet, threads), daemon=False) for _ in range(n)]
    for p in procs:
        p.start()
    return procs


def _helper(specs, exp_dir: Path, settings: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    from resforge.api import train
    _work(specs, exp_dir, settings, train)


def _join(procs: list) -> None:
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} helper process(es) of the experiment failed (exit codes {failed}); "
                           "their error is printed above. Finished runs are kept: rerun to continue")


# ---------------------------------------------------------------- results

def load_run(run_dir: Path, spec: RunSpec) -> dict | None:
    """Curves (error in %, per epoch) and final errors of one run; an unfinished run has its
    curves so far and no final errors (None when it has no finished epoch yet)."""
    metrics = run_dir / "metrics.csv"
    cols = read_metrics_csv(metrics) if metrics.is_file() else {}
    if not len(cols.get("epoch", ())):
        return None
    done = (run_dir / "report.json").is_file()
    report = json.loads((run_dir / "report.json").read_text()) if done else {}
    source = "train_eval_acc" if "train_eval_acc" in cols else "train_acc"
    err = lambda acc: np.round(100 * (1 - acc), 3)            # noqa: E731
    curves = {"epoch": cols["epoch"].astype(int).tolist(), "train_error": err(cols[source]).tolist(),
              "val_error": err(cols["val_acc"]).tolist() if "val_acc" in cols else []}
    grads = {k.removeprefix("grad_norm_"): v.tolist() for k, v in cols.items() if k.startswith("grad_norm_")}
    final = {s: round(100 * (1 - report[s]["top1"]), 3) for s in ("val", "test") if s in report}
    cfg = json.loads((run_dir / "config.json").read_text())
    data = {k: v for k, v in report.get("data", {}).items() if k in ("source", "splits")} if done else \
        {"source": str(cfg["data"]["source"])}           # what the config names, until the report says more
    return {**asdict(spec), "model": spec.model, "finished": done, "train_error": curves["train_error"][-1],
            "train_error_source": source, "val_error": final.get("val"), "test_error": final.get("test"),
            "last_val_error": curves["val_error"][-1] if curves["val_error"] else None,
            "train_seconds": report.get("train_seconds"), "epochs": len(curves["epoch"]),
            "planned_epochs": cfg["train"]["epochs"], "data": data,
            "curves": curves, "grad_norms": grads}


def _stats(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(float(np.mean(v)), 3), "std": round(float(np.std(v)), 3), "n": len(v)}


def aggregate(runs: list[dict], twins: list[dict]) -> list[dict]:
    """One row per (family, depth): mean/std over seeds of the final errors."""
    info = {t["depth"]: t for t in twins}
    rows = []
    for fam in FAMILIES:
        for depth in sorted(info):
            mine = [r for r in runs if r["family"] == fam and r["depth"] == depth]
            if not mine:
                continue
            rows.append({"model": f"{fam}{depth}", "family": fam, "depth": depth,
                         "layers": info[depth]["layers"], "params": info[depth]["params"],
                         **{k: _stats([r[k] for r in mine]) for k in ("train_error", "val_error", "test_error")},
                         "train_minutes": _stats([r["train_seconds"] / 60 if r["train_seconds"] else None
                                                  for r in mine]),
                         "paper_test_error": PAPER_TEST_ERROR.get(f"{fam}{depth}"),
                         "seeds": [r["seed"] for r in mine]})
    return rows


def findings(runs: list[dict], depths: list[int], seeds: list[int]) -> dict:
    """Per seed: does the deepest plain net end with HIGHER training error than the shallowest,
    and the deepest ResNet with LOWER? (the paper's finding; None where runs are missing)."""
    lo, hi = min(depths), max(depths)
    by = {(r["family"], r["depth"], r["seed"]): r["train_error"] for r in runs}
    per_seed = {}
    for s in seeds:
        pl, ph, rl, rh = (by.get((f, d, s)) for f in FAMILIES for d in (lo, hi))
        complete = None not in (pl, ph, rl, rh)
        per_seed[str(s)] = {"plain_degrades": complete and ph > pl, "resnet_improves": complete and rh < rl,
                            "complete": complete}
    ok = [v["plain_degrades"] and v["resnet_improves"] for v in per_seed.values() if v["complete"]]
    return {"shallow": lo, "deep": hi, "per_seed": per_seed,
            "reproduced_every_seed": bool(ok) and all(ok) and len(ok) == len(seeds)}


def summarise(exp_dir: Path, depths, seeds, twins, settings) -> dict:
    """Finished runs make the table and the finding; every run with a finished epoch is drawn."""
    runs = [r for s in run_specs(depths, seeds) if (r := load_run(exp_dir / s.folder, s)) is not None]
    done = [r for r in runs if r["finished"]]
    data = (done or runs)[0]["data"] if runs else {}
    return {"experiment": exp_dir.name, "settings": settings, "data": data,
            "depths": list(depths), "seeds": list(seeds),
            "twins": twins, "table": aggregate(done, twins), "findings": findings(done, depths, seeds),
            "in_progress": [{k: r[k] for k in ("family", "depth", "seed", "epochs", "planned_epochs", "train_error",
                                               "last_val_error")} for r in runs if not r["finished"]],
            "runs": runs}


def write_outputs(exp_dir: Path, summary: dict) -> None:
    from resforge.experiments.figures import plot_degradation, plot_grad_norms
    atomic_write_text(exp_dir / "degradation.json", json.dumps(summary, indent=2))
    atomic_write_text(exp_dir / "degradation.md", render_table(summary))
    plot_degradation(summary, exp_dir / "degradation.png")
    plot_grad_norms(summary, exp_dir / "grad_norms.png")


# ---------------------------------------------------------------- table

def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if stat["n"] > 1 else "")


def _label(fam: str, depth: int) -> str:
    return f"{'plain' if fam == 'plain' else 'ResNet'}-{depth}"


def render_table(summary: dict) -> str:
    """degradation.md: the final-error table and the finding, per seed."""
    s, f = _comparable(summary["settings"]), summary["findings"]
    lines = [f"# Degradation: plain vs residual ({summary['experiment']})", "",
             f"Recipe `{s['recipe']}`" + (f", {s['epochs']} epochs" if s["epochs"] else "")
             + (f", overrides `{' '.join(s['overrides'])}`" if s["overrides"] else "")
             + f"; seeds {', '.join(map(str, summary['seeds']))} (mean ± std over seeds). Errors in %.", "",
             "| network | layers | params | train error | val error | test error | paper test error "
             "| train time (min) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["table"]:
        paper = f"{r['paper_test_error']:.2f}" if r["paper_test_error"] else "–"
        lines.append(f"| {_label(r['family'], r['depth'])} | {r['layers']} | {r['params'] / 1e6:.2f}M | "
                     f"{_cell(r['train_error'])} | {_cell(r['val_error'])} | {_cell(r['test_error'])} | {paper} | "
                     f"{_cell(r['train_minutes'])} |")
    n = summary["data"].get("splits", {})
    lines += ["", f"Data: {summary['data'].get('source', '?')} ({', '.join(f'{v} {k}' for k, v in n.items())}). "
              "Train error: the final weights on a fixed, un-augmented subset of the training split (eval mode). "
              "Val: the held-out validation split (never used to select weights). Test: the test split, "
              "single view, final weights. Train time: wall-clock minutes (with `--jobs` the runs shared the CPU).", ""]
    lines += [_finding_line(seed, v, f["shallow"], f["deep"]) for seed, v in f["per_seed"].items()]
    lines += _progress_lines(summary.get("in_progress", []))
    verdict = ("reproduced for every seed" if f["reproduced_every_seed"] else
               "NOT reproduced for every seed" if all(v["complete"] for v in f["per_seed"].values()) else
               "not decided yet (runs unfinished)")
    return "\n".join(lines + ["", f"**Finding: {verdict}.**", ""])


def _finding_line(seed: str, v: dict, lo: int, hi: int) -> str:
    if not v["complete"]:
        return f"- seed {seed}: incomplete"
    yes = lambda b: "yes" if b else "NO"                      # noqa: E731
    return (f"- seed {seed}: plain-{hi} trains worse than plain-{lo}: {yes(v['plain_degrades'])}; "
            f"ResNet-{hi} trains better than ResNet-{lo}: {yes(v['resnet_improves'])}")


def _progress_lines(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    out = ["", "In progress (drawn in the figure up to their last epoch, not in the table):"]
    for r in runs:
        val = f", val error {r['last_val_error']:.2f}" if r["last_val_error"] is not None else ""
        out.append(f"- {_label(r['family'], r['depth'])} seed "
                   f"{r['seed']}: epoch {r['epochs']} of {r['planned_epochs']}, training error {r['train_error']:.2f}"
                   f"{val}")
    return out

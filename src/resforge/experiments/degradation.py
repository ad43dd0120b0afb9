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
once, on the final weights.  This module runs the experiment; degradation_results.py reads the
runs into the table and the finding, figures.py draws them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from resforge import train_run
from resforge.distributed import refuse
from resforge.checkpoint import atomic_write_text
from resforge.config import load_config
from resforge.experiments.degradation_results import FAMILIES, comparable, summarise, write_outputs
from resforge.models import create_model

DEFAULT_RECIPE = "he2016-cifar10-short"
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


def _check_settings(exp_dir: Path, settings: dict) -> None:
    """A rerun continues the same experiment: its settings must match the first call's
    (data location and progress display aside)."""
    path = exp_dir / "experiment.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if comparable(saved) != comparable(settings):
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


# What a run killed while starting up can leave behind (besides atomic-write temporaries, ".<name>.*.tmp").
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
    refuse("resforge experiment degradation")        # its runs share the CPU by --jobs, not by torchrun
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if train_fn is None:
        train_fn = train_run.train                      # looked up now: tests replace it
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
    summary = summarise(exp_dir, run_specs(depths, seeds), twins, settings)
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
    _work(specs, exp_dir, settings, train_run.train)


def _join(procs: list) -> None:
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} helper process(es) of the experiment failed (exit codes {failed}); "
                           "their error is printed above. Finished runs are kept: rerun to continue")

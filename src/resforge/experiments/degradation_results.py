"""The degradation experiment's results: per-run curves and final errors, the table, the finding.

Reads what the runs wrote (metrics.csv, report.json, config.json) and nothing else, so it can
draw an experiment that is still training (see degradation.report_degradation).  Errors are in %.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from resforge.checkpoint import atomic_write_text
from resforge.config import parse_override, resolve_key
from resforge.plots import read_metrics_csv

FAMILIES = ("plain", "resnet")
# He et al. 2016, Table 6 (CIFAR-10 test error, %, option A, 64k iterations)
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43}
# Where the data is and how training reports itself: not part of what the experiment measures.
ENVIRONMENT_KEYS = {"data.data_root", "data.cache_dir", "data.workers", "train.progress"}


def comparable(settings: dict) -> dict:
    """The experiment's settings without the environment overrides (ENVIRONMENT_KEYS)."""
    keep = [o for o in settings["overrides"] if ".".join(resolve_key(parse_override(o)[0])) not in ENVIRONMENT_KEYS]
    return {**settings, "overrides": keep}


def load_run(run_dir: Path, spec) -> dict | None:
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
            "train_seconds": _whole_run_seconds(report), "epochs": len(curves["epoch"]),
            "planned_epochs": cfg["train"]["epochs"], "data": data,
            "curves": curves, "grad_norms": grads}


def _whole_run_seconds(report: dict) -> float | None:
    """Training wall seconds of the whole run; None when they cover only its last session (a run
    resumed from a state saved before resforge timed across resumes)."""
    whole = report.get("timed_epochs") is not None and report["timed_epochs"] == report.get("epochs_run")
    return report.get("train_seconds") if whole else None


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


def summarise(exp_dir: Path, specs, twins, settings) -> dict:
    """Finished runs make the table and the finding; every run with a finished epoch is drawn.
    specs: the experiment's runs (degradation.RunSpec: family, depth, seed, model, folder)."""
    depths, seeds = sorted({s.depth for s in specs}), list(dict.fromkeys(s.seed for s in specs))
    runs = [r for s in specs if (r := load_run(exp_dir / s.folder, s)) is not None]
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
    s, f = comparable(summary["settings"]), summary["findings"]
    lines = [f"# Degradation: plain vs residual ({summary['experiment']})", "",
             f"Recipe `{s['recipe']}`" + (f", {s['epochs']} epochs" if s["epochs"] else "")
             + (f", overrides `{' '.join(s['overrides'])}`" if s["overrides"] else "")
             + f"; seeds {', '.join(map(str, summary['seeds']))} (mean ± std over seeds). Errors in %.", ""]
    timed = any(r["train_minutes"]["n"] for r in summary["table"])
    lines += _table_rows(summary["table"], timed)
    n = summary["data"].get("splits", {})
    lines += ["", f"Data: {summary['data'].get('source', '?')} ({', '.join(f'{v} {k}' for k, v in n.items())}). "
              "Train error: the final weights on a fixed, un-augmented subset of the training split (eval mode). "
              "Val: the held-out validation split (never used to select weights). Test: the test split, "
              "single view, final weights."
              + (" Train time: wall-clock minutes over the whole run, resumed sessions included (with `--jobs` "
                 "the runs shared the CPU; – where it is not known)." if timed else ""), ""]
    lines += [_finding_line(seed, v, f["shallow"], f["deep"]) for seed, v in f["per_seed"].items()]
    lines += _progress_lines(summary.get("in_progress", []))
    verdict = ("reproduced for every seed" if f["reproduced_every_seed"] else
               "NOT reproduced for every seed" if all(v["complete"] for v in f["per_seed"].values()) else
               "not decided yet (runs unfinished)")
    return "\n".join(lines + ["", f"**Finding: {verdict}.**", ""])


def _table_rows(table: list[dict], timed: bool) -> list[str]:
    """The markdown table; the time column only where some run knows its whole training time."""
    head = "| network | layers | params | train error | val error | test error | paper test error |"
    out = [head + (" train time (min) |" if timed else ""), "|---|" + "---:|" * (7 if timed else 6)]
    for r in table:
        paper = f"{r['paper_test_error']:.2f}" if r["paper_test_error"] else "–"
        out.append(f"| {_label(r['family'], r['depth'])} | {r['layers']} | {r['params'] / 1e6:.2f}M | "
                   f"{_cell(r['train_error'])} | {_cell(r['val_error'])} | {_cell(r['test_error'])} | {paper} |"
                   + (f" {_cell(r['train_minutes'])} |" if timed else ""))
    return out


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

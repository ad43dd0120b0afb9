"""The before/after report of a fine-tuning run: report.json, report.md and comparison.png.

Rows, all scored on the same saved test split:
  (a) the pretrained backbone with a prototype (nearest-class-mean) head, no training;
  (b) a linear probe on the frozen backbone's cached features;
  (c) the chosen policy.
Each row: top-1, macro-F1, per-class F1 and its change against row (a), ECE, AUC (two
classes), training time and trainable parameters. The standard evaluation report of the final
model (resforge.report.write_report: per-split metrics, confusion matrices) is kept in the same
files, after the comparison.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from resforge.report import _atomic_write_text, _jsonable, _md_table, _num, _pct, render_markdown, write_report

_MAX_CLASSES_PLOTTED = 30


def comparison_row(key: str, method: str, metrics: dict, *, train_seconds: float, trainable_params: int,
                   class_names: list[str], baseline: dict | None = None, **extra) -> dict:
    """One row of the comparison from classification_metrics() of the test split."""
    f1 = {c["name"]: c["f1"] for c in metrics["per_class"]}
    row = {"key": key, "method": method, "n": metrics["n"], "top1": metrics["top1"],
           "macro_f1": metrics["macro"]["f1"], "ece": metrics["ece"], "nll": metrics["nll"],
           "auc": metrics.get("auc"), "train_seconds": round(float(train_seconds), 3),
           "trainable_params": int(trainable_params), "per_class_f1": f1}
    if baseline is not None:
        row["per_class_f1_delta"] = {c: f1[c] - baseline["per_class_f1"][c] for c in class_names}
    return {**row, **extra}


def write_finetune_report(out_dir: Path, rows: list[dict], results: dict, *, meta: dict, extra: dict) -> Path:
    """report.json / report.md (comparison first, then the final model's evaluation) and
    comparison.png in out_dir; -> report.md path."""
    out_dir = Path(out_dir)
    plain = {k: v for k, v in extra.items() if k != "finetune"}     # rendered below, not as raw notes
    json_path, md_path = write_report(out_dir, results, meta=meta, extra=plain)
    report = json.loads(json_path.read_text())
    standard = render_markdown(report)
    report["finetune"] = extra.get("finetune", {})
    report["comparison"] = {"split": "test", "rows": rows}
    _atomic_write_text(json_path, json.dumps(_jsonable(report), indent=2, allow_nan=False))
    class_names = [str(c) for c in meta["class_names"]]
    body = render_comparison(rows, class_names, extra)
    _atomic_write_text(md_path, body + "\n\n" + standard.replace("# resforge evaluation report",
                                                                  "# Final model: evaluation", 1))
    plot_comparison(rows, class_names, out_dir / "comparison.png")
    return md_path


def render_comparison(rows: list[dict], class_names: list[str], extra: dict) -> str:
    ft = extra.get("finetune", {})
    n = rows[0]["n"] if rows else 0
    head = (f"# resforge fine-tuning report\n\nPolicy `{ft.get('policy')}` from `{ft.get('source')}` "
            f"({ft.get('arch')}, {ft.get('source_format')} weights) · {len(class_names)} classes · "
            f"every row scored on the same saved test split (n={n}, split hash "
            f"`{str(extra.get('split_hash', ''))[:12]}`)")
    parts = [head, "## Before / after (test)\n\n" + _summary(rows) + _comparison_cost(ft), "## Per-class F1 (test), change against (a)\n\n"
             + _per_class(rows, class_names)]
    if ft.get("phases"):
        parts.append("## Phases of the policy\n\n" + _phases(ft["phases"]))
    if ft.get("notes"):
        parts.append("## Notes\n\n" + "\n".join(f"- {x}" for x in ft["notes"]))
    return "\n\n".join(parts)


def _comparison_cost(ft: dict) -> str:
    """What rows (a) and (b) cost on top of the policy (their test-split feature pass and scoring;
    for a policy without a probe phase, their whole feature pass and probe)."""
    if "comparison_seconds" not in ft:
        return ""
    if not ft.get("compare", True):
        return "\n\nRows (a) and (b) skipped (finetune.compare=false)."
    return (f"\n\nRows (a) and (b) cost {ft['comparison_seconds']:.1f} s beyond what the policy needs "
            "(finetune.compare=false skips them).")


def _summary(rows: list[dict]) -> str:
    auc = any(r.get("auc") is not None for r in rows)
    head = ["row", "method", "top-1", "macro-F1", "ECE"] + (["AUC"] if auc else []) + ["train time", "trainable params"]
    body = []
    for r in rows:
        cells = [f"({r['key']})", r["method"], _pct(r["top1"]), _pct(r["macro_f1"]), _pct(r["ece"])]
        cells += [_num(r.get("auc"))] if auc else []
        body.append(cells + [f"{r['train_seconds']:.1f} s", f"{r['trainable_params']:,}"])
    return _md_table(head, body)


def _per_class(rows: list[dict], class_names: list[str]) -> str:
    head = ["class"] + [f"({r['key']}) F1" + ("" if r["key"] == rows[0]["key"] else " (Δ)") for r in rows]
    body = []
    for c in class_names:
        cells = [c]
        for r in rows:
            d = r.get("per_class_f1_delta", {}).get(c)
            cells.append(_pct(r["per_class_f1"][c]) + (f" ({100 * d:+.2f})" if d is not None else ""))
        body.append(cells)
    return _md_table(head, body)


def _best(p: dict) -> str:
    """'7 (val_loss 0.4350)' or '3 (val_acc 83.33%)': the value early stopping / restore-best used."""
    if p.get("diverged"):
        return "diverged: undone"
    if p.get("best") is None:
        return "n/a"
    value = _pct(p["best"]) if p.get("monitor") == "val_acc" else f"{p['best']:.4f}"
    return f"{p.get('best_epoch', '?')} ({p.get('monitor')} {value})"


def _phases(phases: list[dict]) -> str:
    head = ["phase", "epochs run", "best epoch (monitored value)", "trainable params", "seconds",
            "frozen tensors unchanged"]
    body = [[p["name"], str(p.get("epochs_run", "")), _best(p), f"{p['trainable']:,}",
             f"{p.get('seconds', 0):.1f}", str(p.get("frozen_checked", 0))] for p in phases]
    return _md_table(head, body)


def plot_comparison(rows: list[dict], class_names: list[str], out_png: Path) -> Path:
    """Left: headline metrics per row; right: per-class F1 per row (first 30 classes)."""
    metrics = [("top-1", "top1"), ("macro-F1", "macro_f1"), ("ECE", "ece")]
    if all(r.get("auc") is not None for r in rows):
        metrics.insert(2, ("AUC", "auc"))
    shown = class_names[:_MAX_CLASSES_PLOTTED]
    fig = Figure(figsize=(7 + 0.45 * len(shown), 4.6), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(metrics) + 1, len(shown) + 1]})
    _bars(left, [m for m, _ in metrics], rows, lambda r: [r.get(k) or 0.0 for _, k in metrics])
    left.set_title("test split")
    _bars(right, shown, rows, lambda r: [r["per_class_f1"][c] for c in shown])
    right.set_title("per-class F1" + (f" (first {len(shown)})" if len(shown) < len(class_names) else ""))
    for ax in (left, right):
        ax.set_ylim(0, 1.05)
        ax.grid(True, axis="y", alpha=0.3)
    handles = left.get_legend_handles_labels()[0]
    fig.legend(handles, [f"({r['key']}) {r['method'][:50]}" for r in rows], loc="lower center",
               ncol=min(len(rows), 3), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))            # room for the legend below the panels
    fig.savefig(out_png)
    return Path(out_png)


def _bars(ax, labels: list[str], rows: list[dict], values) -> None:
    x = np.arange(len(labels))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values(r), width, label=f"({r['key']})")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                       fontsize=8)

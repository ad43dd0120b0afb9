"""The update report: did the update hurt what the model knew?

Figures (fractions in [0, 1]; "old data" = the test splits of every data set the parent had
seen, "new data" = the test split of this update's data):
    old_top1            top-1 of the new version on the old data, pooled over its images
    old_top1_before     the same for the parent version (evaluated now, same images)
    new_top1            top-1 on the new data;  top1: pooled over old and new
    forgetting          average forgetting (Chaudhry et al. 2018): over old data sets j, the best
                        accuracy any earlier version had on j minus the new version's
    backward_transfer   BWT (Lopez-Paz & Ranzato 2017): over old data sets j, the new version's
                        accuracy on j minus the accuracy of the version that learnt j, right after
    per_class_forgetting  per old class: its recall on the old data under the parent minus now
    accuracy_matrix     a[t][j]: version t on data set j (null where t had not seen j or j could
                        not be loaded), drawn as accuracy_matrix.png
The first line of report.md is the verdict.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HURT_POINTS = 1.0          # a drop of more than this many points of old top-1 is "hurt"


def accuracy_entry(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """{top1, n, per_class {name: recall}, support {name: n}} of (N, K) logits and head labels,
    per-class figures for the classes present only."""
    pred = logits.argmax(1)
    out = {"top1": float((pred == labels).mean()) if len(labels) else float("nan"), "n": int(len(labels)),
           "per_class": {}, "support": {}}
    for c in np.unique(labels):
        m = labels == c
        out["per_class"][class_names[c]] = float((pred[m] == c).mean())
        out["support"][class_names[c]] = int(m.sum())
    return out


def pooled_top1(entries: list[dict]) -> float | None:
    n = sum(e["n"] for e in entries)
    return sum(e["top1"] * e["n"] for e in entries) / n if n else None


def pooled_per_class(entries: list[dict]) -> dict[str, float]:
    num, den = {}, {}
    for e in entries:
        for c, r in e["per_class"].items():
            s = e.get("support", {}).get(c, 1)
            num[c] = num.get(c, 0.0) + r * s
            den[c] = den.get(c, 0) + s
    return {c: num[c] / den[c] for c in num if den[c]}


def summarise(history: list[tuple[int, dict]], parent_now: dict, new_acc: dict, data: list[dict], new_id: str,
              unavailable: dict[str, str]) -> dict:
    """The report's figures. history: (version, accuracy record) of every earlier version, oldest
    first; parent_now: the parent's accuracy on the old data sets, measured now; new_acc: the new
    version's accuracy on every data set it could evaluate; data: the new version's data records."""
    parent_n = history[-1][0]
    rows = [(v, dict(acc)) for v, acc in history]
    rows[-1] = (parent_n, {**rows[-1][1], **parent_now})
    old_ids = [d["id"] for d in data if d["id"] != new_id and d["id"] in new_acc]
    introduced = {d["id"]: d.get("version") for d in data}
    forgetting, bwt, per_set = [], [], {}
    for j in old_ids:
        before = [acc[j]["top1"] for v, acc in rows if j in acc and _num(acc[j].get("top1"))]
        now = new_acc[j]["top1"]
        learnt = next((acc[j]["top1"] for v, acc in rows if v == introduced.get(j) and j in acc), None)
        entry = {"now": now, "best_before": max(before) if before else None, "when_learnt": learnt}
        if before:
            forgetting.append(max(before) - now)
            entry["forgetting"] = max(before) - now
        if learnt is not None:
            bwt.append(now - learnt)
            entry["backward_transfer"] = now - learnt
        per_set[j] = entry
    old_now = [new_acc[j] for j in old_ids]
    old_before = [parent_now[j] for j in old_ids if j in parent_now]
    cls_before, cls_now = pooled_per_class(old_before), pooled_per_class(old_now)
    per_class = {c: cls_before[c] - cls_now[c] for c in cls_before if c in cls_now}
    versions = [v for v, _ in rows] + [parent_n + 1]
    ids = [d["id"] for d in data]
    accs = [acc for _, acc in rows] + [new_acc]
    matrix = [[(a[j]["top1"] if j in a and _num(a[j].get("top1")) else None) for j in ids] for a in accs]
    out = {"old_top1": pooled_top1(old_now), "old_top1_before": pooled_top1(old_before),
           "new_top1": new_acc[new_id]["top1"] if new_id in new_acc else None,
           "top1": pooled_top1([new_acc[j] for j in ids if j in new_acc]),
           "forgetting": float(np.mean(forgetting)) if forgetting else None,
           "backward_transfer": float(np.mean(bwt)) if bwt else None,
           "per_class_forgetting": dict(sorted(per_class.items(), key=lambda kv: -kv[1])),
           "per_data_set": per_set, "unavailable": dict(unavailable),
           "accuracy_matrix": {"versions": [f"v{v}" for v in versions], "data": ids, "values": matrix}}
    out["verdict"] = verdict(out)
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def verdict(s: dict) -> str:
    """One sentence: did the update hurt the old data, with the numbers."""
    new = f"new data top-1 {s['new_top1']:.3f}" if s.get("new_top1") is not None else "no new test data"
    if s.get("old_top1") is None or s.get("old_top1_before") is None:
        why = "; ".join(f"{k}: {v}" for k, v in s.get("unavailable", {}).items()) or "no old test data"
        return f"UNKNOWN whether the update hurt the old data: it could not be evaluated ({why}); {new}."
    drop = 100 * (s["old_top1_before"] - s["old_top1"])
    worst = next(iter(s["per_class_forgetting"].items()), None)
    change = f"old data top-1 {s['old_top1_before']:.3f} -> {s['old_top1']:.3f} ({-drop:+.1f} points)"
    if drop > HURT_POINTS:
        tail = f"; worst class {worst[0]!r} lost {100 * worst[1]:.1f} points" if worst and worst[1] > 0 else ""
        return f"HURT: the update made the model worse on the old data: {change}{tail}; {new}."
    return f"KEPT: the update did not hurt the old data: {change}; {new}."


# ---------------------------------------------------------------- files

def write(out_dir: Path, summary: dict, info: dict) -> dict:
    """report.json (summary + info), report.md and the two figures, into out_dir. -> report dict."""
    from resforge.atomic import atomic_write_text
    out_dir = Path(out_dir)
    report = {**summary, **info}
    figures = [plot_matrix(summary["accuracy_matrix"], out_dir / "accuracy_matrix.png")]
    if summary["per_class_forgetting"]:
        figures.append(plot_forgetting(summary["per_class_forgetting"], out_dir / "forgetting.png"))
    report["figures"] = [p.name for p in figures]
    atomic_write_text(out_dir / "report.json", json.dumps(_clean(report), indent=2, allow_nan=False))
    atomic_write_text(out_dir / "report.md", markdown(report))
    return report


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _f(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if pct else f"{v:.4f}"


def markdown(r: dict) -> str:
    m = r.get("method", {})
    lines = [f"**{r['verdict']}**", "",
             f"# Update {r.get('version', '')} of {r.get('run', '')} (parent {r.get('parent', '')}, method "
             f"{m.get('name', '?')}{' + weight aligning' if m.get('align') else ''})", "",
             "| figure | value |", "|---|---|",
             f"| old data top-1 before (parent) | {_f(r['old_top1_before'])} |",
             f"| old data top-1 after (`old_top1`) | {_f(r['old_top1'])} |",
             f"| new data top-1 (`new_top1`) | {_f(r['new_top1'])} |",
             f"| all test data top-1 (`top1`) | {_f(r['top1'])} |",
             f"| average forgetting (`forgetting`) | {_f(r['forgetting'])} |",
             f"| backward transfer (`backward_transfer`) | {_f(r['backward_transfer'])} |", ""]
    if r.get("unavailable"):
        lines += ["Not evaluated (data unavailable): " + "; ".join(f"{k}: {v}" for k, v in r["unavailable"].items()),
                  ""]
    mat = r["accuracy_matrix"]
    lines += ["## Accuracy matrix (row: version, column: data set; test top-1)", "",
              "| | " + " | ".join(mat["data"]) + " |", "|---" * (len(mat["data"]) + 1) + "|"]
    for v, row in zip(mat["versions"], mat["values"]):
        lines.append(f"| {v} | " + " | ".join(_f(x) for x in row) + " |")
    lines += ["", "![accuracy matrix](accuracy_matrix.png)", ""]
    if r["per_class_forgetting"]:
        lines += ["## Per-class forgetting on the old data (recall points lost since the parent)", "",
                  "| class | forgetting (points) |", "|---|---|"]
        lines += [f"| {c} | {_f(v, pct=True)} |" for c, v in r["per_class_forgetting"].items()]
        lines += ["", "![per-class forgetting](forgetting.png)", ""]
    data = r.get("data_sets", [])
    if data:
        lines += ["## Data sets", "", "| id | source | classes | train images | learnt in |", "|---|---|---|---|---|"]
        lines += [f"| {d['id']} | {d['source']} | {len(d['class_names'])} | {d.get('images', {}).get('train', '-')} "
                  f"| v{d.get('version')} |" for d in data]
        lines.append("")
    for key in ("classes", "buffer", "train_seconds", "notes"):
        if r.get(key):
            lines.append(f"- {key}: {json.dumps(r[key]) if not isinstance(r[key], str) else r[key]}")
    return "\n".join(lines) + "\n"


def plot_matrix(mat: dict, out_png: Path) -> Path:
    from resforge.plots import _new_figure, _save
    vals = np.array([[np.nan if x is None else x for x in row] for row in mat["values"]], dtype=float)
    fig = _new_figure(1, 1, cell=(1.2 + 0.8 * len(mat["data"]), 1.0 + 0.6 * len(mat["versions"])))
    ax = fig.subplots()
    im = ax.imshow(vals, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(mat["data"])), mat["data"])
    ax.set_yticks(range(len(mat["versions"])), mat["versions"])
    ax.set_xlabel("data set (test split)")
    ax.set_ylabel("version")
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center",
                        color="white" if vals[i, j] < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="top-1")
    ax.set_title("accuracy after version t on data set j")
    return _save(fig, out_png)


def plot_forgetting(per_class: dict, out_png: Path) -> Path:
    from resforge.plots import _new_figure, _save
    names = list(per_class)[:40]
    vals = [100 * per_class[c] for c in names]
    fig = _new_figure(1, 1, cell=(max(4.0, 0.35 * len(names) + 1.5), 3.0))
    ax = fig.subplots()
    ax.bar(range(len(names)), vals, color=["tab:red" if v > 0 else "tab:green" for v in vals])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("recall points lost")
    ax.set_title("per-class forgetting on the old data (since the parent)")
    return _save(fig, out_png)

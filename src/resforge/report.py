"""Evaluation report files: report.json, report.md, confusion_<split>.csv / .png, reliability_<split>.png.

report.json layout (one object per evaluated split, next to run-level fields):
    {"resforge_version": "0.1.0", "model": {...}, "class_names": [...], "splits": ["val", "test"],
     ...extra (e.g. "rejected", "data"),
     "val": {"n", "top1", "top5", "macro", "per_class", "confusion", "ece", "nll",
             "calibration": {"ece", "mean_confidence", "accuracy", "n_bins", "bins": [{"lo", "hi",
                             "count", "confidence", "accuracy"}]}, ...},
     "test": {...},
     "ood": {"score", "threshold", "accept_rate", "fitted_on", "n", "flagged": {split: fraction}}
            or {"threshold": null, "why": ...}}      (resforge.ood)
Writing into a folder that already has a report for the same model and classes merges: new
splits replace same-named ones and the others are kept, so `evaluate` can add splits later.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from resforge.ood import DESCRIBED
from resforge.plots import plot_confusion, plot_reliability
from resforge.atomic import atomic_write_text

log = logging.getLogger(__name__)

_SPLIT_ORDER = ("train", "val", "test")
_RESERVED = ("resforge_version", "model", "class_names", "splits")
_MAX_REJECTED_LISTED = 50


def write_report(
    out_dir: str | Path,
    results: dict[str, dict],
    *,
    meta: dict,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write/merge report.json + report.md and per-split confusion CSV/PNG into out_dir.

    results: {split: classification_metrics(...) dict (plus any extra per-split fields)}.
    meta: needs "model" (dict or name) and "class_names".
    extra: run-level additions, e.g. {"rejected": [{"path", "reason"}], "data": {...}}.
    Returns (report.json path, report.md path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = [str(c) for c in meta["class_names"]]
    new = _new_report(results, meta, class_names, extra or {})
    report = _merge(_load_json(out_dir / "report.json"), new)
    for split, metrics in results.items():
        _write_confusion(out_dir, split, metrics, class_names)
        if isinstance(metrics.get("calibration"), dict):
            plot_reliability(metrics["calibration"]["bins"], out_dir / f"reliability_{_file_part(split)}.png",
                             f"{split}: MSP reliability, ECE {metrics['calibration']['ece']:.2%}")
    json_path = _atomic_write_text(out_dir / "report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False))
    md_path = _atomic_write_text(out_dir / "report.md", render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict) -> str:
    """Readable report.md from a report.json-shaped dict."""
    splits = report.get("splits", [])
    parts = [_md_header(report), _md_summary(report, splits)]
    if any(isinstance(report[s].get("calibration"), dict) for s in splits) or isinstance(report.get("ood"), dict):
        parts.append(_md_calibration(report, splits))
    if isinstance(report.get("tta"), dict):
        parts.append(_md_tta(report["tta"]))
    parts += [_md_per_class(split, report[split]) for split in splits if report[split].get("per_class")]
    if report.get("warnings"):
        parts.insert(1, _md_warnings(report["warnings"]))      # first thing read after the header
    if isinstance(report.get("compute"), dict):
        parts.append(_md_compute(report["compute"]))
    if report.get("rejected"):
        parts.append(_md_rejected(report["rejected"]))
    notes = {k: v for k, v in report.items()
             if k not in (*_RESERVED, *splits, "rejected", "tta", "warnings", "ood", "compute")}
    if notes:
        parts.append(_md_notes(notes))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- building and merging


def _new_report(results: dict, meta: dict, class_names: list[str], extra: dict) -> dict:
    clash = [s for s in results if s in _RESERVED or s in extra]
    if clash:
        raise ValueError(f"split names {clash} collide with report fields {[*_RESERVED, *extra]}")
    report = {"resforge_version": _version(), "model": meta["model"], "class_names": class_names}
    if meta.get("preprocessing"):       # third-party weights: the statistics were assumed
        report["preprocessing"] = meta["preprocessing"]
    report.update(extra)
    report.update(results)
    report["splits"] = _ordered(results)
    return report


def _merge(old: dict | None, new: dict) -> dict:
    """Keep old splits when the model and classes match; new fields and splits win."""
    if not old:
        return new
    if old.get("class_names") != new["class_names"] or _model_name(old.get("model")) != _model_name(new["model"]):
        log.warning("existing report.json is for another model or class list; replacing it")
        return new
    merged = dict(old)
    merged.update(new)
    merged["splits"] = _ordered([*old.get("splits", []), *new["splits"]])
    return merged


def _ordered(splits) -> list[str]:
    """train/val/test first (in that order), then any other split names alphabetically."""
    names = set(splits)
    return [s for s in _SPLIT_ORDER if s in names] + sorted(names - set(_SPLIT_ORDER))


def _model_name(model: Any) -> Any:
    return model.get("name") if isinstance(model, dict) else model


def _version() -> str:
    try:
        from resforge import __version__

        return str(__version__)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("resforge")
        except PackageNotFoundError:
            return "unknown"


def _load_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); writing a fresh report", path, e)
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- files


def _write_confusion(out_dir: Path, split: str, metrics: dict, class_names: list[str]) -> None:
    cm = metrics.get("confusion")
    if cm is None:
        return
    stem = "confusion_" + _file_part(split)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true\\pred", *class_names])
    writer.writerows([name, *map(int, row)] for name, row in zip(class_names, cm))
    _atomic_write_text(out_dir / f"{stem}.csv", buf.getvalue())
    title = f"{split}: confusion (rows = true class)"
    if isinstance(metrics.get("top1"), (int, float)):
        title += f", top-1 {metrics['top1']:.2%}"
    plot_confusion(cm, class_names, out_dir / f"{stem}.png", title)


def _file_part(split: str) -> str:
    """A split name as part of a file name."""
    return re.sub(r"[^\w.-]", "_", split)


def _atomic_write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def _jsonable(x: Any) -> Any:
    """Plain JSON types only: numpy/torch scalars -> Python, tuples -> lists, NaN/inf -> null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)  # Path and anything else: readable rather than a crash


# ---------------------------------------------------------------- markdown pieces


def _md_header(report: dict) -> str:
    name = _model_name(report.get("model")) or "?"
    k = len(report.get("class_names", []))
    version = report.get("resforge_version", "?")
    return f"# resforge evaluation report\n\nModel `{name}` · {k} classes · resforge {version}"


def _md_summary(report: dict, splits: list[str]) -> str:
    has_auc = any(report[s].get("auc") is not None for s in splits)
    has_tta = any("tta" in report[s] for s in splits)
    # top-5 of K <= 5 classes counts every image as a hit (always 100%): no column for it
    has_top5 = len(report.get("class_names", [])) > 5
    head = (["split", "n", "top-1"] + (["top-5"] if has_top5 else []) + ["macro-F1", "ECE", "NLL"]
            + (["AUC"] if has_auc else []) + (["TTA views"] if has_tta else []))
    rows = []
    for s in splits:
        m = report[s]
        row = [s, str(m.get("n", "")), _pct(m.get("top1")), *([_pct(m.get("top5"))] if has_top5 else []),
               _pct((m.get("macro") or {}).get("f1")), _pct(m.get("ece")), _num(m.get("nll"))]
        views = len(m.get("tta_views") or []) if m.get("tta") else 0
        rows.append(row + ([_num(m.get("auc"))] if has_auc else [])
                    + ([f"{views} (TTA)" if views else "1 (no TTA)"] if has_tta else []))
    return "## Summary\n\n" + _md_table(head, rows)


def _md_per_class(split: str, m: dict) -> str:
    head = ["class", "precision", "recall", "F1", "support"]
    rows = [[c["name"], _pct(c["precision"]), _pct(c["recall"]), _pct(c["f1"]), str(c["support"])]
            for c in m["per_class"]]
    for avg in ("macro", "weighted"):
        if m.get(avg):
            a = m[avg]
            rows.append([f"*{avg} avg*", _pct(a["precision"]), _pct(a["recall"]), _pct(a["f1"]), str(m.get("n", ""))])
    return f"## Per-class: {split}\n\n" + _md_table(head, rows)


def _md_calibration(report: dict, splits: list[str]) -> str:
    """MSP calibration per split (resforge.ood) and the OOD threshold with its flag rates."""
    rows = []
    for s in splits:
        c = report[s].get("calibration")
        if isinstance(c, dict):
            gap = c["mean_confidence"] - c["accuracy"]
            rows.append([s, str(report[s].get("n", "")), _pct(c["accuracy"]), _pct(c["mean_confidence"]),
                         f"{100 * gap:+.2f} pt", _pct(c["ece"]), f"reliability_{_file_part(s)}.png"])
    lines = ["## MSP calibration", "",
             "Confidence = the maximum softmax probability; ECE = the mean |accuracy - confidence| over "
             f"{report[splits[0]].get('calibration', {}).get('n_bins', 15) if splits else 15} equal-width "
             "confidence bins, weighted by their share of images. Confidence above accuracy: overconfident.", ""]
    if rows:
        lines += [_md_table(["split", "n", "accuracy", "mean confidence", "confidence - accuracy", "ECE",
                             "reliability diagram"], rows), ""]
    o = report.get("ood")
    if isinstance(o, dict) and o.get("threshold") is not None:
        flagged = ", ".join(f"{s} {_pct(v)}" for s, v in (o.get("flagged") or {}).items())
        what = DESCRIBED.get(o.get("score"))
        lines.append(f"Out-of-distribution flag (`resforge predict --ood`, serve): an image is flagged when its "
                     f"{what or o.get('score')} is above {o['threshold']:.4g}, the threshold that accepts "
                     f"{_pct(o.get('accept_rate'))} of the {o.get('n', '?')} images of the {o.get('fitted_on', '?')} "
                     f"split." + (f" Flagged here: {flagged}." if flagged else ""))
    elif isinstance(o, dict):
        lines.append(f"No out-of-distribution threshold: {o.get('why', 'not fitted')}.")
    return "\n".join(lines).rstrip()


def _md_tta(tta: dict) -> str:
    views = tta.get("views") or []
    return ("## Test-time augmentation\n\n"
            f"Logits averaged over {len(views)} view(s): {', '.join(f'`{v}`' for v in views)}; "
            f"chosen by {tta.get('from', '?')}. A mirror is used only for networks trained with flips, "
            "one-pixel shifts only for networks trained with translations.")


def _md_compute(c: dict) -> str:
    """flops.compute_record: what the training cost, in FLOPs and seconds."""
    def num(key, scale=1.0, fmt="{:.3g}"):
        v = c.get(key)
        return fmt.format(v / scale if scale != 1 else v) if isinstance(v, (int, float)) else "?"
    rows = [["FLOPs per training image (forward + backward)", num("flops_per_train_image", 1e6, "{:.1f} M")],
            ["FLOPs per evaluated image (forward)", num("flops_per_eval_image", 1e6, "{:.1f} M")],
            ["training images seen", num("train_images_seen", fmt="{:,}")],
            ["training FLOPs", num("train_flops")],
            ["evaluation FLOPs while training", num("eval_flops")],
            ["seconds in training passes", num("train_seconds", fmt="{:.1f}")],
            ["wall seconds (evaluation and checkpoints included)", num("wall_seconds", fmt="{:.1f}")],
            ["achieved in training passes", num("achieved_flops_per_s", 1e9, "{:.1f} GFLOP/s")]]
    size = "x".join(str(v) for v in c.get("input_size", []))
    return "\n".join([f"## Compute\n\nAt input size {size}; {c.get('counter', '')}.\n",
                      _md_table(["", "value"], rows)])


def _md_warnings(warnings: list[dict]) -> str:
    """training/health.py's diagnosis: what went wrong, the likely cause and the fix."""
    return "\n".join(["## Warnings", ""] + [f"- {w.get('message', w.get('kind', '?'))}" for w in warnings])


def _md_rejected(rejected: list[dict]) -> str:
    lines = [f"## Rejected files ({len(rejected)})", ""]
    for r in rejected[:_MAX_REJECTED_LISTED]:
        lines.append(f"- `{r.get('path', '?')}`: {r.get('reason', '?')}")
    if len(rejected) > _MAX_REJECTED_LISTED:
        lines.append(f"- … and {len(rejected) - _MAX_REJECTED_LISTED} more (full list in report.json)")
    return "\n".join(lines)


def _md_notes(notes: dict) -> str:
    lines = ["## Data notes", ""]
    for key, value in notes.items():
        if isinstance(value, dict):
            lines.append(f"- **{key}**")
            lines += [f"  - {k}: {_short(v)}" for k, v in value.items()]
        else:
            lines.append(f"- **{key}**: {_short(value)}")
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"

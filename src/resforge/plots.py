"""Figures written to PNG without pyplot: training curves (results.png), confusion matrices and
reliability diagrams.

Each figure is a standalone `matplotlib.figure.Figure` on an Agg canvas, so nothing touches
pyplot's global figure registry and plotting is safe from worker threads and headless servers.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from resforge.atomic import finish_temporary, temporary_for

# Panels drawn first, in this order: (title, columns). Any other numeric column gets its own panel.
_MAIN_PANELS = (
    ("loss", ("train_loss", "train_eval_loss", "val_loss")),
    ("accuracy", ("train_acc", "train_eval_acc", "val_acc", "val_top5")),
    ("learning rate", ("lr",)),
)
_GRAD_PREFIX, _GRAD_TITLE = "grad_norm_", "gradient norm per stage"  # train.grad_norms columns: one panel
_LOG_PANELS = ("loss", "learning rate", _GRAD_TITLE)  # log y-axis when values span decades
_MAX_EXTRA_PANELS = 9  # keeps the grid readable if a run logs many columns
# metrics.csv's clock columns (training/loop.py time_columns): an x-axis, not panels of their own
_CLOCK = ("epoch_seconds", "wall_seconds", "train_seconds", "images_seen")
_TIME_TITLE = "accuracy against wall time"


def plot_training_curves(metrics_csv: Path, out_png: Path, *, label_smoothing: float = 0.0) -> Path:
    """Draw loss / accuracy / lr panels (train vs val) plus one panel per other numeric column.

    metrics.csv columns: epoch, lr, train_loss, train_acc, val_loss, val_acc and optionally more
    (val_top5, val_ece, ...). Missing columns are skipped; empty cells become gaps (NaN).
    Rows repeated for the same epoch (a resumed run) keep the last one.
    label_smoothing: the run's optim.label_smoothing. train_loss is the loss optimised, which then
    includes it (a floor above 0), while val/train_eval losses are plain cross-entropy; the
    legend says so, or the gap between the curves reads as overfitting.
    """
    cols = read_metrics_csv(metrics_csv)
    x = cols.pop("epoch", None)
    n = len(next(iter(cols.values()), []))
    x = np.arange(1, n + 1, dtype=float) if x is None else x
    wall = cols.get("wall_seconds")
    clock = {c: cols.pop(c) for c in _CLOCK if c in cols}
    panels = _panel_specs(cols)
    accuracy = dict(panels).get("accuracy", ())
    timed = wall is not None and accuracy and np.isfinite(wall).any()
    if timed:                                  # time-to-accuracy: the same curves over seconds
        panels.insert(2, (_TIME_TITLE, accuracy))
    nrows, ncols = _grid(len(panels))
    fig = _new_figure(nrows, ncols, cell=(4.0, 3.0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels = {"train_loss": f"train_loss (incl. label smoothing {label_smoothing:g})"} if label_smoothing else {}
    for ax, (title, names) in zip(axes, panels):
        if title == _TIME_TITLE:
            minutes = np.nanmax(clock["wall_seconds"]) > 180
            _draw_panel(ax, clock["wall_seconds"] / (60 if minutes else 1), {c: cols[c] for c in names}, title,
                        labels, xlabel="wall time since the start, evaluation included (" +
                        ("min)" if minutes else "s)"))
        else:
            _draw_panel(ax, x, {c: cols[c] for c in names}, title, labels)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if n == 0:
        fig.suptitle(f"{Path(metrics_csv).name}: no rows yet")
    return _save(fig, out_png)


def plot_confusion(cm, class_names: list[str], out_png: Path, title: str = "confusion") -> Path:
    """Row-normalised confusion matrix (rows = true class); raw counts annotated when K <= 20."""
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    row_sum = cm.sum(axis=1, keepdims=True)
    # Classes with no samples get an all-zero row instead of a 0/0 NaN row.
    norm = np.divide(cm, row_sum, out=np.zeros(cm.shape, dtype=float), where=row_sum > 0)
    side = float(np.clip(0.45 * k + 3.0, 5.0, 24.0))
    fig = _new_figure(1, 1, cell=(side + 1.2, side))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    _label_axes(ax, class_names, k)
    if k <= 20:
        _annotate_counts(ax, cm, norm)
    ax.set_title(title)
    return _save(fig, out_png)


def plot_reliability(bins: list[dict], out_png: Path, title: str = "reliability") -> Path:
    """Reliability diagram of ood.reliability() bins: accuracy per confidence bin against the
    diagonal (perfect calibration; bars below it are overconfident), and the share of images
    per bin underneath."""
    lo = np.array([b["lo"] for b in bins])
    width = np.array([b["hi"] - b["lo"] for b in bins])
    count = np.array([b["count"] for b in bins], dtype=float)
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    fig = _new_figure(1, 1, cell=(4.6, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(lo, acc, width=width, align="edge", edgecolor="black", linewidth=0.5, label="accuracy")
    top.plot(lo + width / 2, conf, "_", color="tab:red", markersize=10, markeredgewidth=2,
             label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left", fontsize="small", framealpha=0.9)
    bottom.bar(lo, count / max(count.sum(), 1.0), width=width, align="edge", color="tab:grey")
    bottom.set(xlim=(0, 1), xlabel="confidence (max softmax probability)", ylabel="share")
    return _save(fig, out_png)


def read_metrics_csv(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv -> {column: float array}; unparsable or empty cells are NaN.

    Columns that are entirely empty are dropped. If an "epoch" column exists the rows are
    de-duplicated (last wins) and sorted by epoch.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0].keys()) if rows else _header(path)
    cols = {c: np.array([_to_float(r.get(c)) for r in rows], dtype=float) for c in names if c}
    cols = {c: v for c, v in cols.items() if v.size == 0 or not np.isnan(v).all()}
    if "epoch" in cols and cols["epoch"].size:
        cols = _dedupe_by_epoch(cols)
    return cols


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _to_float(cell) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan


def _dedupe_by_epoch(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    epoch = cols["epoch"]
    keep = ~np.isnan(epoch)
    idx = np.flatnonzero(keep)
    # np.unique on the reversed epochs finds the *last* occurrence of each epoch.
    _, first_in_rev = np.unique(epoch[idx][::-1], return_index=True)
    order = idx[::-1][first_in_rev]  # sorted by epoch, since np.unique sorts
    return {c: v[order] for c, v in cols.items()}


def _panel_specs(cols: dict[str, np.ndarray]) -> list[tuple[str, tuple[str, ...]]]:
    """[(title, present column names)] — main panels first, then leftover columns singly."""
    panels, used = [], set()
    for title, names in _MAIN_PANELS:
        present = tuple(c for c in names if c in cols)
        used.update(names)
        if present:
            panels.append((title, present))
    grads = tuple(c for c in cols if c.startswith(_GRAD_PREFIX))
    if grads:
        panels.append((_GRAD_TITLE, grads))
        used.update(grads)
    extra = [c for c in cols if c not in used][:_MAX_EXTRA_PANELS]
    panels += [(c, (c,)) for c in extra]
    return panels or [("no metrics", ())]


def _draw_panel(ax, x: np.ndarray, series: dict[str, np.ndarray], title: str,
                labels: dict[str, str] | None = None, xlabel: str = "epoch") -> None:
    marker = "o" if len(x) <= 30 else None  # dots help read short runs, clutter long ones
    labels = labels or {}
    for name, y in series.items():
        style = "--" if name.startswith("train") else "-"
        ax.plot(x, y, style, marker=marker, markersize=3, label=labels.get(name, name))
    if use_log_axis(title, series):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(n in labels for n in series):
        ax.legend(fontsize=8)


def use_log_axis(title: str, series: dict[str, np.ndarray]) -> bool:
    """Log y-axis when a panel's positive values span more than two decades: lr warm-up/decay, and
    a loss that exploded (val_loss 5697 then 2.4 flattens every normal epoch onto the axis)."""
    return title in _LOG_PANELS and bool(series) and _positive_span(series) > 100


def _positive_span(series: dict[str, np.ndarray]) -> float:
    vals = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in series.values()])
    return float(vals.max() / vals.min()) if vals.size else 0.0


def _label_axes(ax, class_names: list[str], k: int) -> None:
    names = [str(c) for c in class_names]
    fontsize = 9 if k <= 20 else max(4, int(9 - (k - 20) / 10))
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels=names, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(ticks, labels=names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def _annotate_counts(ax, cm: np.ndarray, norm: np.ndarray) -> None:
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                colour = "white" if norm[i, j] > 0.5 else "black"  # stay legible on dark cells
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=colour)


def _grid(n_panels: int) -> tuple[int, int]:
    ncols = min(n_panels, 3 if n_panels <= 6 else 4)
    return math.ceil(n_panels / ncols), ncols


def _new_figure(nrows: int, ncols: int, *, cell: tuple[float, float]) -> Figure:
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly; no pyplot/backend state involved
    return fig


def _save(fig: Figure, out_png: Path) -> Path:
    """Render to a temp file then os.replace, so readers never see a half-written PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(out_png)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        finish_temporary(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
    return out_png

"""Figures of the degradation experiment, in the style of He et al. 2016, Fig. 6.

degradation.png: one panel per family (plain | ResNet); per depth one colour, training error
dashed, held-out (val) error solid, the final test error as a dot at the last epoch; curves
are the mean over seeds.  grad_norms.png: one panel per stage, per-stage gradient norm
(epoch mean) over training, residual solid vs plain dotted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from resforge.plots import _new_figure, _save

FAMILY_TITLES = {"plain": "plain networks", "resnet": "ResNets"}


def _colours(depths: list[int]) -> dict[int, tuple]:
    """Shallow = light, deep = dark, as the paper's figure orders its curves."""
    from matplotlib import colormaps
    cmap = colormaps["plasma"]
    pos = np.linspace(0.75, 0.05, num=len(depths)) if len(depths) > 1 else [0.3]
    return {d: cmap(float(p)) for d, p in zip(sorted(depths), pos)}


def _mean_curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean over runs) over the epochs every run has reached."""
    curves = [r["curves"][key] for r in runs if r["curves"][key]]
    if not curves:
        return np.array([]), np.array([])
    n = min(len(c) for c in curves)
    return np.arange(1, n + 1), np.mean([c[:n] for c in curves], axis=0)


def _select(summary: dict, family: str, depth: int) -> list[dict]:
    return [r for r in summary["runs"] if r["family"] == family and r["depth"] == depth]


def _error_panel(ax, summary: dict, family: str, colours: dict) -> float:
    """Draws one family; returns the largest error plotted after epoch 1 (for the y range)."""
    top = 0.0
    for depth in summary["depths"]:
        runs = _select(summary, family, depth)
        if not runs:
            continue
        c, label = colours[depth], f"{'plain' if family == 'plain' else 'ResNet'}-{depth}"
        x, tr = _mean_curve(runs, "train_error")
        if not all(r["finished"] for r in runs):                   # drawn while still training
            label += f" (epoch {len(x)} of {max(r['planned_epochs'] for r in runs)})"
        ax.plot(x, tr, "--", color=c, lw=1.3)
        x2, va = _mean_curve(runs, "val_error")
        ax.plot(x2, va, "-", color=c, lw=2.0, label=label)
        tests = [r["test_error"] for r in runs if r["test_error"] is not None]
        if tests and len(x2):
            ax.plot([x2[-1]], [np.mean(tests)], "o", color=c, ms=5)
        top = max(top, _peak(tr), _peak(va))
    return top


def _peak(y: np.ndarray) -> float:
    """Largest value after the first epoch (whose near-chance error would squash the plot)."""
    y = y[1:] if len(y) > 1 else y
    y = y[np.isfinite(y)]
    return float(y.max()) if len(y) else 0.0


def plot_degradation(summary: dict, out_png: Path) -> Path:
    fig = _new_figure(1, 2, cell=(5.2, 4.0))
    axes = fig.subplots(1, 2, sharey=True)
    colours = _colours(summary["depths"])
    top = max(_error_panel(ax, summary, fam, colours) for ax, fam in zip(axes, FAMILY_TITLES))
    for ax, fam in zip(axes, FAMILY_TITLES):
        ax.set_title(FAMILY_TITLES[fam])
        ax.set_xlabel("epoch")
        ax.set_ylim(0, min(100.0, max(top * 1.1, 5.0)))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("error (%)")
    source = summary.get("data", {}).get("source", "")
    fig.suptitle(f"{source}: dashed = training error, solid = held-out (val) error, dot = final test error",
                 fontsize=9)
    return _save(fig, out_png)


def _stages(summary: dict) -> list[str]:
    seen: list[str] = []
    for r in summary["runs"]:
        seen += [s for s in r["grad_norms"] if s not in seen]
    return seen


def _grad_curve(runs: list[dict], stage: str) -> tuple[np.ndarray, np.ndarray]:
    curves = [r["grad_norms"][stage] for r in runs if r["grad_norms"].get(stage)]
    if not curves:
        return np.array([]), np.array([])
    n = min(len(c) for c in curves)
    return np.arange(1, n + 1), np.mean([c[:n] for c in curves], axis=0)


def plot_grad_norms(summary: dict, out_png: Path) -> Path:
    stages = _stages(summary) or ["(no grad_norm columns)"]
    ncols = min(len(stages), 5)
    nrows = -(-len(stages) // ncols)
    fig = _new_figure(nrows, ncols, cell=(3.4, 3.0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    colours = _colours(summary["depths"])
    for ax, stage in zip(axes, stages):
        for fam, style in (("resnet", "-"), ("plain", ":")):
            for depth in summary["depths"]:
                x, y = _grad_curve(_select(summary, fam, depth), stage)
                if len(x):
                    ax.plot(x, y, style, color=colours[depth], lw=1.6,
                            label=f"{'plain' if fam == 'plain' else 'ResNet'}-{depth}")
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines() and min(min(l.get_ydata()) for l in ax.get_lines()) > 0:
            ax.set_yscale("log")
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    axes[0].set_ylabel("grad L2 norm (epoch mean)")
    if axes[0].get_lines():
        axes[0].legend(fontsize=7)
    fig.suptitle("per-stage gradient norm over training: ResNet solid, plain dotted", fontsize=9)
    return _save(fig, out_png)

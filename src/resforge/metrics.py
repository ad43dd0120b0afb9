"""Classification metrics from a (N, K) score matrix, as JSON-ready plain Python values.

Everything returned here goes straight into report.json, so accuracies are fractions in
[0, 1], ints are ints, and nothing is a numpy scalar.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from resforge.ood import ece, reliability  # one binning for ECE and the reliability diagram

_EPS = 1e-12  # floor for probabilities before log, so a confident miss costs ~27.6 nats, not inf


def classification_metrics(
    logits_or_probs: Any,
    labels: Any,
    class_names: list[str],
    *,
    from_logits: bool = True,
    n_bins: int = 15,
) -> dict:
    """Top-1/top-5, per-class P/R/F1, macro/weighted averages, confusion, ECE, NLL (+ AUC if K == 2).

    logits_or_probs: (N, K) logits (from_logits=True) or probabilities; numpy or torch.
    labels: (N,) integer class indices in [0, K).
    "top5" is top-min(5, K) accuracy, so it is 1.0 for K <= 5.
    Classes absent from `labels` get support 0 and zeros (zero_division=0) rather than errors.
    """
    probs = _to_probs(_as_numpy(logits_or_probs, np.float64), from_logits)
    y = _as_numpy(labels, np.int64).reshape(-1)
    n, k = _check_inputs(probs, y, class_names)
    preds = probs.argmax(axis=1)
    out: dict = {
        "n": n,
        "top1": float(np.mean(preds == y)),
        "top5": topk_accuracy(probs, y, min(5, k)),
        "nll": float(-np.mean(np.log(np.maximum(probs[np.arange(n), y], _EPS)))),
        "ece": expected_calibration_error(probs, y, n_bins=n_bins),
    }
    out.update(_prf(y, preds, class_names))
    out["confusion"] = confusion_matrix(y, preds, labels=np.arange(k)).astype(int).tolist()
    if k == 2:
        out["auc"] = _binary_auc(probs[:, 1], y)
    return out


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores. probs (N, K), labels (N,)."""
    # argpartition is O(N*K); order inside the top k does not matter for a hit test.
    top = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017).

    Sum over bins of |accuracy - mean confidence| weighted by the bin's share of samples.
    Bins are (lo, hi]; a confidence of exactly 0 lands in the first bin.
    """
    return ece(reliability(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins))


def _prf(y: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict:
    """Per-class and averaged precision/recall/F1 over all K classes (absent ones included)."""
    ks = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y, preds, labels=ks, zero_division=0)
    per_class = [
        {"name": str(name), "precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
        for name, pi, ri, fi, si in zip(class_names, p, r, f, s)
    ]
    out = {"per_class": per_class}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, preds, labels=ks, average=avg, zero_division=0)
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    return out


def _binary_auc(pos_prob: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC of the positive (index 1) class; None when only one class is present (undefined)."""
    if np.unique(y).size < 2:
        return None
    return float(roc_auc_score(y, pos_prob))


def _to_probs(scores: np.ndarray, from_logits: bool) -> np.ndarray:
    """(N, K) scores -> (N, K) probabilities; stable softmax for logits."""
    if not from_logits:
        return scores
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _as_numpy(x: Any, dtype) -> np.ndarray:
    """Accept numpy arrays, torch tensors (any device/dtype, incl. bf16) and lists."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_inputs(probs: np.ndarray, y: np.ndarray, class_names: list[str]) -> tuple[int, int]:
    if probs.ndim != 2:
        raise ValueError(f"expected scores of shape (N, K), got {probs.shape}")
    n, k = probs.shape
    if n == 0:
        raise ValueError("cannot compute metrics on an empty set (N == 0)")
    if y.shape[0] != n:
        raise ValueError(f"{n} score rows but {y.shape[0]} labels")
    if len(class_names) != k:
        raise ValueError(f"{k} score columns but {len(class_names)} class names")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got range [{y.min()}, {y.max()}]")
    if not np.isfinite(probs).all():
        raise ValueError("scores contain NaN or inf")
    return n, k

"""How far to trust an answer: calibration of the maximum softmax probability (MSP) and an
out-of-distribution (OOD) flag with a threshold fitted on the validation split. numpy only, so
loaders and the service can import it without the training stack.

A classifier gives every image a class, also an image unlike anything it was trained on, and
often with a high probability. Two questions, answered on held-out data:

calibration   Is the MSP c(x) = max_k softmax(z)_k a probability? Confidences are put into 15
              equal-width bins (lo, hi] of [0, 1]; per bin b with n_b images, mean confidence
              conf_b and accuracy acc_b,  ECE = sum_b (n_b / N) |acc_b - conf_b|  (Guo et al.
              2017). Overconfidence shows as mean confidence > accuracy.
scores        Higher = less like the training data (T = 1 unless the record says otherwise):
                msp     S(x) = -log max_k softmax(z / T)_k = logsumexp(z / T) - max_k z_k / T,
                        the MSP baseline (Hendrycks & Gimpel 2017) in log form, which does not
                        round to 0 for confident images as 1 - MSP does in floating point;
                energy  E(x) = -T logsumexp(z / T) (Liu et al. 2020): the negative log of the
                        softmax's normaliser, low when some logit is large.
              msp is the default (config eval.ood_score): on the digits default run (seeds 0-2)
              it told uniform noise, constant grey, shuffled and inverted digits and CIFAR-10
              photos from real digits apart better than energy in all 15 comparisons (AUROC
              0.56-0.99 against 0.02-0.98; bench/ood_digits.py); energy fails where an image gives
              large logits to every class (noise on seed 1: AUROC 0.02, i.e. noise looked more
              familiar than digits). Without label smoothing the two came closer (4 of 5 to msp).
threshold     t is the smallest val score with at least `accept_rate` (0.95) of val images at
              or below it, i.e. the ceil(0.95 N)-th smallest. An image is flagged
              out-of-distribution when S(x) > t, so about 5% of in-distribution images are
              flagged by design: the false-alarm rate is chosen, the detection rate depends on
              how strange the OOD images are.

The fitted threshold travels in the checkpoint sidecar and exports as meta["ood"] (artifact.py
validates it): {"score": "msp", "temperature": 1.0, "threshold": t, "accept_rate": 0.95,
"fitted_on": "val", "n": N}. Logits with test-time augmentation are averaged logits, whose
scores are not those of the single-view logits predict and serve compute: only plain logits
are used to fit.
"""
from __future__ import annotations

import math

import numpy as np

SCORES = ("msp", "energy")    # score names a sidecar may declare (config eval.ood_score adds "none")
DESCRIBED = {"msp": "-log(max softmax probability)", "energy": "energy -logsumexp(logits)"}
ACCEPT_RATE = 0.95            # default fraction of in-distribution (val) images the threshold accepts
N_BINS = 15                   # equal-width confidence bins of the calibration
MIN_FIT = 20                  # fewer val images than 1 / (1 - ACCEPT_RATE) leave no tail to fit
# Why a model may have none, and the remedy: said by predict --ood and eval reports.
NO_THRESHOLD = ("it carries no OOD threshold (`resforge train` and `resforge finetune` fit one on the validation "
                "split at the end of a run; runs without a validation split, scored with eval.tta=true or with "
                "eval.ood_score=none, third-party weights, and runs or exports made before resforge fitted it "
                "have none): train or fine-tune it again with a validation split")


def _logits(z) -> np.ndarray:
    """(N, K) float64 from numpy, lists or torch tensors (any device, bf16 included)."""
    if hasattr(z, "detach"):
        z = z.detach().float().cpu().numpy()
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"expected logits of shape (N, K), got {z.shape}")
    return z


def _shifted_lse(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max_k z_k, logsumexp(z) - max_k z_k) per row, without overflow, and as log1p of the other
    classes' share so that a confident row's small remainder (e^-40) is not rounded to 0."""
    rows, top = np.arange(len(z)), z.argmax(axis=1)
    e = np.exp(z - z[rows, top][:, None])
    e[rows, top] = 0.0                                     # the top class's exp(0) = 1 is the "1" of log1p
    return z[rows, top], np.log1p(e.sum(axis=1))


def energy(logits, temperature: float = 1.0) -> np.ndarray:
    """E = -T logsumexp(z / T) per row: (N, K) logits -> (N,) float64 (lower = more familiar)."""
    top, rest = _shifted_lse(_logits(logits) / temperature)
    return -temperature * (top + rest)


def neg_log_msp(logits, temperature: float = 1.0) -> np.ndarray:
    """S = -log max_k softmax(z / T)_k per row: (N, K) -> (N,) float64 >= 0 (0 = certain)."""
    return _shifted_lse(_logits(logits) / temperature)[1]


def softmax(logits) -> np.ndarray:
    z = _logits(logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def score(logits, record: dict) -> np.ndarray:
    """The score `record` (a meta["ood"], validated) names, per row: (N, K) logits -> (N,)."""
    fn = {"msp": neg_log_msp, "energy": energy}[record["score"]]
    return fn(logits, record.get("temperature") or 1.0)          # optional: absent or null = 1


def fit_threshold(scores, accept_rate: float = ACCEPT_RATE) -> float:
    """The ceil(accept_rate * N)-th smallest score: at least that fraction of `scores` is <= it."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"need finite scores to fit a threshold, got {s.size} ({np.isfinite(s).sum()} finite)")
    if not 0 < accept_rate < 1:
        raise ValueError(f"accept_rate must lie in (0, 1), got {accept_rate}")
    k = max(1, math.ceil(accept_rate * s.size - 1e-9))    # (the 1e-9: 0.95 * 100 is 95.00000000000001)
    return float(s[k - 1])


def fit(val_logits, score_name: str = "msp", accept_rate: float = ACCEPT_RATE) -> dict:
    """meta["ood"] for a model whose validation-split logits are `val_logits` (N, K)."""
    record = {"score": score_name, "temperature": 1.0, "accept_rate": accept_rate, "fitted_on": "val"}
    s = score(val_logits, record)
    return {**record, "threshold": fit_threshold(s, accept_rate), "n": int(s.size)}


def flagged(scores, record: dict) -> np.ndarray:
    """True where an image is out-of-distribution by `record`'s threshold: score > threshold."""
    return np.asarray(scores, dtype=np.float64) > record["threshold"]


def fit_on_val(logits_by_split: dict, score_name: str = "msp", accept_rate: float = ACCEPT_RATE) -> dict:
    """fit() of the plain val logits in {split: (N, K) logits}, or {"threshold": None, "why": ...}
    when none can be fitted (score_name "none", no plain val logits, fewer than MIN_FIT)."""
    z = logits_by_split.get("val")
    if score_name == "none":
        why = "eval.ood_score=none"
    elif z is None:
        why = ("the val split was not scored on plain logits (eval.splits without val, data.val_fraction=0, "
               "or eval.tta=true)")
    elif len(z) < MIN_FIT:
        why = f"only {len(z)} validation images; fitting a {1 - accept_rate:.0%} tail needs at least {MIN_FIT}"
    else:
        return fit(z, score_name, accept_rate)
    return {"threshold": None, "why": why}


def fitted(record: dict | None) -> bool:
    return record is not None and record.get("threshold") is not None


def summary(record: dict | None, logits_by_split: dict) -> dict:
    """report.json's "ood": the threshold and, per split scored, the fraction flagged (val: about
    1 - accept_rate by construction; test: the false-alarm rate on unseen in-distribution
    images); without a threshold, why there is none (record None: the model carries none)."""
    if not fitted(record):
        return record or {"threshold": None, "why": NO_THRESHOLD}
    return {**record, "flagged": {s: float(flagged(score(z, record), record).mean())
                                  for s, z in logits_by_split.items()}}


def describe(summary_: dict) -> str:
    """One console line of a summary(): the threshold and the flag rates, or why there is none."""
    if summary_.get("threshold") is None:
        return f"OOD flag: none ({summary_.get('why', 'not fitted')})"
    rates = ", ".join(f"{s} {100 * v:.1f}%" for s, v in summary_.get("flagged", {}).items())
    what = DESCRIBED.get(summary_["score"], summary_["score"])
    return (f"OOD flag: {what} > {summary_['threshold']:.4g} (accepts {100 * summary_['accept_rate']:.0f}% of "
            f"{summary_['n']} {summary_['fitted_on']} images)" + (f"; flagged {rates}" if rates else ""))


def reliability(confidence, correct, n_bins: int = N_BINS) -> list[dict]:
    """Per equal-width bin (lo, hi] (a confidence of 0 goes to the first): image count, mean
    confidence and accuracy (None when empty). confidence (N,) in [0, 1], correct (N,) bool."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(b, weights=hit, minlength=n_bins)
    return [{"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": int(count[i]),
             "confidence": float(conf_sum[i] / count[i]) if count[i] else None,
             "accuracy": float(hit_sum[i] / count[i]) if count[i] else None} for i in range(n_bins)]


def ece(bins: list[dict]) -> float:
    """Expected calibration error of reliability() bins: sum_b (n_b / N) |acc_b - conf_b|."""
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / n)


def calibration(logits, labels, n_bins: int = N_BINS) -> dict:
    """MSP calibration of (N, K) logits against (N,) labels: report.json's per-split "calibration"."""
    p = softmax(logits)
    y = np.asarray(labels).reshape(-1)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    bins = reliability(conf, correct, n_bins)
    return {"ece": ece(bins), "mean_confidence": float(conf.mean()), "accuracy": float(correct.mean()),
            "n_bins": n_bins, "bins": bins}

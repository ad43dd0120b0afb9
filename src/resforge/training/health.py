"""Run-health diagnosis: say when a run's loss exploded or its accuracy stayed at chance.

A default recipe meets data it was never tuned on; a run can then "finish" with a val loss in the
thousands or chance accuracy and nothing saying so. `diagnose` reads what every run already has
(the per-epoch history and the final per-split metrics) and returns warnings, each with the
likely cause and the fix; train and finetune print them and record them in report.json.
"""
from __future__ import annotations

import math
import shlex

EXPLODED_FACTOR = 10.0   # a loss above 10 x ln K (10x a uniform guess's loss) has blown up
CHANCE_SIGMAS = 2.0      # accuracy within 2 binomial standard errors of the chance rate is chance


def exploded_limit(num_classes: int) -> float:
    """The loss above which a run has blown up: 10 x ln K, a uniform guess's loss being ln K."""
    return EXPLODED_FACTOR * math.log(max(int(num_classes), 2))


def diagnose(history: list[dict], num_classes: int, results: dict | None = None, *,
             data: str | None = None, lr: float | None = None) -> list[dict]:
    """-> [{"kind": "exploded" | "chance", "message": one sentence with cause and fix, ...figures}].

    history: fit's rows (epoch, train_loss, val_loss, ...); results: {split: metrics with "top1",
    "n" and "confusion"} after training; data/lr name the run's source and optim.lr in the fix."""
    out = []
    k = max(int(num_classes), 2)
    limit = exploded_limit(k)
    lower = f"a lower optim.lr (e.g. optim.lr={lr / 10:g})" if lr else "a lower optim.lr"
    find = "resforge lr-find" + (f" --data {shlex.quote(str(data))}" if data else "")
    bad = [(r["epoch"], key, r[key]) for r in history for key in ("train_loss", "val_loss")
           if isinstance(r.get(key), (int, float)) and not (r[key] <= limit)]     # nan/inf count too
    if bad:
        epoch, key, value = max(bad, key=lambda b: b[2] if math.isfinite(b[2]) else math.inf)
        epochs = sorted({b[0] for b in bad})
        last = history[-1]
        recovered = all(not (last.get(c, 0) > limit) for c in ("train_loss", "val_loss")) and epochs[-1] < last["epoch"]
        tail = " (it recovered by the end, but the early epochs were wasted)" if recovered else ""
        out.append({"kind": "exploded", "epochs": epochs, "worst": {"epoch": epoch, key: value},
                    "limit": round(limit, 3),
                    "message": f"loss exploded: {key} {value:.4g} in epoch {epoch} is over {EXPLODED_FACTOR:g}x "
                               f"ln({k}) = {limit:.3g}{tail}; the learning rate is too high for this data: "
                               f"run `{find}` and use its suggestion, or {lower}"})
    split = next((s for s in ("test", "val") if s in (results or {})), None)
    if split is not None:
        m = results[split]
        n, acc = int(m.get("n", 0)), float(m["top1"])
        rows = [sum(r) for r in m.get("confusion", [])]
        chance = max(max(rows) / n if rows and n else 0.0, 1.0 / k)      # majority class or uniform guess
        noise = CHANCE_SIGMAS * math.sqrt(chance * (1 - chance) / max(n, 1))
        if n and acc <= chance + noise:
            epochs = history[-1]["epoch"] if history else 0
            out.append({"kind": "chance", "split": split, "top1": acc, "chance": round(chance, 4), "n": n,
                        "message": f"{split} accuracy {acc:.4f} is chance level ({chance:.4f}: "
                                   f"{'the majority class' if chance > 1 / k + 1e-9 else f'1/{k}'}, "
                                   f"± {noise:.3f} on {n} images): the model has not learned yet. Likely "
                                   f"cause: too few steps ({epochs} epochs run): raise train.epochs; or a "
                                   f"learning rate that does not suit this data: run `{find}`"
                                   + (f" or try {lower}" if bad else "")})
    return out


def history_from_csv(path) -> list[dict]:
    """metrics.csv rows as fit's history (numbers; empty cells left out) for runs that only kept the file."""
    import csv
    from pathlib import Path
    if not Path(path).is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for key, cell in r.items():
                try:
                    row[key] = float(cell)
                except (TypeError, ValueError):
                    pass
            if "epoch" in row:
                rows.append(row)
    return rows


def format_warnings(warnings: list[dict], desc: str = "") -> str:
    return "\n".join(f"{desc}WARNING: {w['message']}" for w in warnings)

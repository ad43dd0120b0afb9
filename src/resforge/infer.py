"""Predict image files/folders with a trained model -> top-k rows, a table, CSV or JSON.

Preprocessing comes only from the checkpoint meta (input_size, mean, std), so predictions use
exactly the geometry and normalisation the model was trained with. Files that cannot be read
become rows with an "error" message: counted and reported, never silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from resforge.ood import NO_THRESHOLD, flagged, softmax
from resforge.ood import score as ood_score

log = logging.getLogger(__name__)

_PROGRESS_MIN_FILES = 100  # below this a progress bar is just noise


def predict(
    source: str | Path,
    inputs: list[str | Path],
    *,
    topk: int = 5,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    out: str | Path | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    ood: bool = False,
) -> list[dict]:
    """Top-k predictions for every image file in `inputs` (files and folders, recursive).

    source: run folder, checkpoint or weights file (see checkpoint.load_for_inference), or an
    exported .onnx (fp32 or int8) / .torchscript artifact, run by its own runtime.
    Returns one row per file, in input order: {"path", "topk": [{"label", "prob"}], "error"}.
    Unreadable or missing files get "error" set and an empty "topk".
    If `out` ends in .csv or .json the rows are also saved there.
    workers: decoding threads (default: one per CPU core, at most 8; PIL releases the GIL while
    decoding and resizing, so threads scale like processes without pickling images back).
    progress: show a progress bar (default: on a terminal, for 100+ files).
    threads: torch CPU threads for the model (default: auto, see training/device.choose_threads).
    ood: also flag images unlike the training data: every row gets "ood_score" (the score the
    model's meta["ood"] names, higher = less familiar) and "ood" (score above the threshold fitted
    on the validation split, resforge.ood); a model without one is refused (ValueError) before
    any file is read.
    """
    from resforge.training.device import apply_threads  # lazy: keeps `import resforge.infer` light

    if topk < 1 or batch_size < 1:
        raise ValueError(f"topk and batch_size must be >= 1, got {topk}, {batch_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (decoding threads), got {workers}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    apply_threads(threads)
    entries = _expand(inputs)
    model, meta = _load_model(source, model_name, device, threads)
    if ood and not meta.get("ood"):
        raise ValueError(f"cannot flag out-of-distribution images with {source}: {NO_THRESHOLD}, "
                         "or predict without --ood")
    rows = {p: _error_row(p, "file not found") for p, exists in entries if not exists}
    paths = [p for p, exists in entries if exists]
    batches = _run_batches(model, meta, paths, batch_size, device, workers=workers, progress=progress)
    for path, logits, error in batches:
        if error is not None:
            rows[path] = _error_row(path, error, ood)
        else:
            rows[path] = _topk_row(path, softmax(logits[None])[0], meta["class_names"], topk)
            if ood:
                rows[path] |= _ood_cells(logits, meta["ood"])
    ordered = [rows[p] for p, _ in entries]
    _log_summary(ordered)
    if out is not None:
        save_predictions(ordered, out)
    return ordered


def _load_model(source, model_name: str | None, device: torch.device, threads: int | None):
    """(model, meta): an exported artifact as its backend (np -> np logits, meta from inside it),
    anything else as an eager module."""
    from resforge.backends import artifact_format, load_backend
    from resforge.checkpoint import load_for_inference

    if artifact_format(source) is not None:
        backend = load_backend(source, device=str(device), threads=threads)
        return backend, backend.meta
    model, meta = load_for_inference(source, model_name=model_name, device=str(device))
    # channels_last: the (B, H, W, C) uint8 batches already have that layout, and at batch 64
    # oneDNN convolutions ran 1.2x faster in it here (bench/inference_speed.py); same outputs.
    return model.to(memory_format=torch.channels_last), meta


def expand_inputs(inputs: list[str | Path]) -> list[str]:
    """Image files named by `inputs`, folders expanded recursively (sorted) by image extension."""
    return [p for p, exists in _expand(inputs) if exists]


def _expand(inputs: list[str | Path]) -> list[tuple[str, bool]]:
    """[(path, exists)] in input order; duplicates dropped (first wins).

    Files named explicitly are kept whatever their extension (the decoder decides), so a
    mistyped file is reported rather than ignored; paths that do not exist come back as False.
    """
    from resforge.data.images import IMAGE_EXTENSIONS

    if isinstance(inputs, (str, Path)):  # a lone path, not an iterable of characters
        inputs = [inputs]
    exts = {e.lower() for e in IMAGE_EXTENSIONS}
    entries, seen = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                log.warning("no image files under %s", p)
            found = [(f, True) for f in found]
        else:
            found = [(str(p), p.exists())]
        entries += [e for e in found if e[0] not in seen]
        seen.update(f for f, _ in found)
    return entries


def format_predictions(rows: list[dict], *, max_path: int = 60) -> str:
    """Readable fixed-width table: path, then "label prob%" for each of the top-k, then (rows of
    predict(ood=True)) "OOD" or "ok" with the OOD score.  Control characters in paths, labels
    and errors are shown escaped (a newline as \\n), one row a line."""
    if not rows:
        return "no files"
    k = max(1, max((len(r["topk"]) for r in rows), default=0))  # >= 1 column even if all failed
    with_ood = any("ood" in r for r in rows)
    head = ["path"] + [f"top{i + 1}" for i in range(k)] + (["ood (score)"] if with_ood else [])
    body = [[_shorten(_printable(r["path"]), max_path)] + [_printable(c) for c in _topk_cells(r, k)]
            + ([_ood_cell(r)] if with_ood else []) for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    n_err = sum(r["error"] is not None for r in rows)
    n_ood = sum(bool(r.get("ood")) for r in rows)
    lines.append(f"{len(rows)} files, {n_err} errors" + (f", {n_ood} flagged out-of-distribution (OOD)"
                                                          if with_ood else ""))
    return "\n".join(lines)


def save_predictions(rows: list[dict], path: str | Path) -> Path:
    """Save rows as .csv (path, top1_label, top1_prob, top2_label, top2_prob, ..., [ood_score, ood,]
    error) or .json.
    CSV cells that a spreadsheet would run as a formula (starting with = + - @ tab or CR) get a
    leading ' (OWASP's CSV-injection advice); the JSON keeps every value as it is."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = _rows_to_csv(rows)
    elif suffix == ".json":
        text = json.dumps(rows, indent=2)
    else:
        raise ValueError(f"unsupported predictions file {path.name!r}: use .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)  # atomic: no half-written file if interrupted
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- batching and inference


_PREFETCH_BATCHES = 2  # batches decoded ahead of the model: absorbs slow files, bounds memory


def _run_batches(model, meta: dict, paths: list[str], batch_size: int, device: torch.device, *,
                 workers: int | None = None, progress: bool | None = None) -> Iterator:
    """Yield (path, probs (K,) ndarray | None, error | None) per file, in order.

    Decoding runs in a thread pool (PIL releases the GIL in decode and resize) up to
    _PREFETCH_BATCHES batches ahead of the model, so decode and inference overlap while
    memory stays at a few batches of images whatever the folder size.
    """
    prep = Preprocess(meta)
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, _progress(len(paths), progress) as bar:
        pending = deque(_submit(pool, prep, b) for b in batches[:_PREFETCH_BATCHES])
        for i, batch in enumerate(batches):
            decoded = [f.result() for f in pending.popleft()]
            if i + _PREFETCH_BATCHES < len(batches):
                pending.append(_submit(pool, prep, batches[i + _PREFETCH_BATCHES]))
            yield from _infer(model, prep, batch, decoded, device)
            bar.update(len(batch))


def _submit(pool: ThreadPoolExecutor, prep: "Preprocess", batch: list[str]) -> list[Future]:
    return [pool.submit(prep.load, p) for p in batch]


def _infer(model, prep: "Preprocess", batch: list[str], decoded: list, device: torch.device) -> Iterator:
    """decoded[i] is an (H, W, C) uint8 array or an error string; yields (path, logits (K,), error)."""
    ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    logits = _logits_batch(model, prep, [decoded[i] for i in ok], device) if ok else None
    row_of = {i: j for j, i in enumerate(ok)}
    for i, path in enumerate(batch):
        if i in row_of:
            yield path, logits[row_of[i]], None
        else:
            yield path, None, decoded[i]


def _logits_batch(model, prep: "Preprocess", arrays: list[np.ndarray], device: torch.device) -> np.ndarray:
    if not isinstance(model, torch.nn.Module):       # an artifact's backend: float32 NCHW in, logits out
        return np.asarray(model(prep.batch(arrays)), dtype=np.float32)
    # Ship uint8 (4x smaller than float) and convert on the device; match the model's dtype.
    dtype = next(model.parameters(), torch.empty(0)).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    x = torch.from_numpy(np.stack(arrays)).to(device)  # (B, H, W, C) uint8
    x = prep.normalise(x.permute(0, 3, 1, 2).float()).to(dtype)  # -> (B, C, H, W)
    with torch.inference_mode():
        logits = model(x)
    return logits.float().cpu().numpy()  # (B, K)


class Preprocess:
    """Decode + resize + normalise, configured only from checkpoint (or export) meta.

    Shared by `predict`, the export parity check and the HTTP service, so all three feed a
    model exactly the same tensors. max_pixels guards against decompression bombs.
    """

    def __init__(self, meta: dict, *, max_pixels: int | None = None):
        from resforge.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, resize_image

        self._decode, self._resize, self._image_error = decode_image, resize_image, ImageError
        self.max_pixels = int(max_pixels or DEFAULT_MAX_PIXELS)
        self.resize_mode = meta.get("resize", "shorter-center-crop")
        self.channels, self.height, self.width = (int(v) for v in meta["input_size"])
        mean = torch.tensor(meta["mean"], dtype=torch.float32)
        std = torch.tensor(meta["std"], dtype=torch.float32)
        # mean/std are on the [0, 1] scale (torchvision convention); a mean > 1 can only mean a
        # 0..255 scale, so fold that in instead of producing garbage inputs.
        to_uint8_units = 1.0 if float(mean.max()) > 1.0 else 255.0
        self.mean = (mean * to_uint8_units).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = (std * to_uint8_units).view(1, -1, 1, 1)
        if self.mean.shape[1] != self.channels or self.std.shape[1] != self.channels:
            raise ValueError(f"meta mean/std length does not match input_size channels {self.channels}")

    def decode(self, src, *, draft: bool = False) -> np.ndarray:
        """Path or bytes -> (H, W, C) uint8 at the model's input size; raises ImageError.
        draft: a large JPEG may be decoded at 1/2..1/8 scale, never below 2x the input size."""
        size = 2 * max(self.height, self.width) if draft else None
        arr = self._decode(src, self.channels, max_pixels=self.max_pixels, draft=size)
        arr = self._resize(arr, (self.height, self.width), mode=self.resize_mode)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if arr.shape != (self.height, self.width, self.channels):
            raise self._image_error("<image>", f"unexpected decoded shape {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def load(self, path: str) -> np.ndarray | str:
        """(H, W, C) uint8 ready to stack, or an error message (worker threads must not raise)."""
        try:
            return self.decode(path)
        except self._image_error as e:
            return str(e) or type(e).__name__
        except Exception as e:  # noqa: BLE001 — one odd file must not abort a 10k-file run; it is reported
            return f"{type(e).__name__}: {e}"

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in 0..255 -> normalised, same shape."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def batch(self, arrays: list[np.ndarray]) -> np.ndarray:
        """[(H, W, C) uint8] -> float32 (B, C, H, W) normalised, C-contiguous (what ONNX
        Runtime and TorchScript exports take as input)."""
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
        return self.normalise(x).contiguous().numpy()


_Preprocess = Preprocess  # the earlier private name


def _progress(total: int, show: bool | None = None):
    from tqdm.auto import tqdm

    quiet = (total < _PROGRESS_MIN_FILES or not sys.stderr.isatty()) if show is None else not show
    return tqdm(total=total, unit="img", desc="predict", disable=quiet, leave=False)


# ---------------------------------------------------------------- rows and output


def _topk_row(path: str, probs: np.ndarray, class_names: list[str], topk: int) -> dict:
    k = min(topk, probs.shape[0])
    top = np.argsort(-probs, kind="stable")[:k]
    labels = [class_names[i] if i < len(class_names) else f"class_{i}" for i in top]
    return {"path": path, "topk": [{"label": lab, "prob": float(probs[i])} for lab, i in zip(labels, top)],
            "error": None}


def _error_row(path: str, error: str, ood: bool = False) -> dict:
    return {"path": path, "topk": [], "error": error, **({"ood_score": None, "ood": None} if ood else {})}


def _ood_cells(logits: np.ndarray, record: dict) -> dict:
    score = ood_score(logits[None], record)
    return {"ood_score": float(score[0]), "ood": bool(flagged(score, record)[0])}


def _log_summary(rows: list[dict]) -> None:
    errors = [r for r in rows if r["error"] is not None]
    if errors:
        log.warning("%d of %d files could not be predicted, e.g. %s: %s",
                    len(errors), len(rows), errors[0]["path"], errors[0]["error"])


def _topk_cells(row: dict, k: int) -> list[str]:
    if row["error"] is not None:
        cells = [f"ERROR: {row['error']}"]
    else:
        cells = [f"{t['label']} {100 * t['prob']:.1f}%" for t in row["topk"]]
    return cells + [""] * (k - len(cells))


def _ood_cell(row: dict) -> str:
    if row.get("ood") is None:
        return ""
    return f"{'OOD' if row['ood'] else 'ok'} {row['ood_score']:.3g}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"}


def _printable(text: str) -> str:
    """One table cell on one line: control characters (newline, CR, tab, ESC...) shown escaped."""
    return str(text).translate(_CONTROL)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(text: str) -> str:
    """A text cell a spreadsheet will not evaluate: `=cmd|...` becomes `'=cmd|...`."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _rows_to_csv(rows: list[dict]) -> str:
    k = max(1, max((len(r["topk"]) for r in rows), default=0))  # top1 columns always present
    head = ["path"]
    for i in range(1, k + 1):
        head += [f"top{i}_label", f"top{i}_prob"]
    buf = io.StringIO()
    # RFC 4180 line ends: with "\n" alone the writer leaves a CR inside a cell unquoted, and readers
    # then split that row in two.
    writer = csv.writer(buf, lineterminator="\r\n")
    with_ood = any("ood" in r for r in rows)                # predict(ood=True): ood_score, ood columns
    writer.writerow(head + (["ood_score", "ood"] if with_ood else []) + ["error"])
    for r in rows:
        cells = []
        for t in r["topk"]:
            cells += [_csv_cell(t["label"]), f"{t['prob']:.6f}"]
        cells += [""] * (2 * k - len(cells))
        if with_ood:
            flag = r.get("ood")
            cells += ["" if flag is None else f"{r['ood_score']:.6f}", "" if flag is None else str(flag).lower()]
        writer.writerow([_csv_cell(r["path"]), *cells, _csv_cell(r["error"] or "")])
    return buf.getvalue()

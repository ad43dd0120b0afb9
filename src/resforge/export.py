"""Export a model to ONNX or TorchScript, and prove the artifact computes what PyTorch does.

    resforge export runs/x --format onnx         -> runs/x/weights/best.onnx
    resforge export runs/x --format torchscript  -> runs/x/weights/best.torchscript
    resforge export runs/x --format onnx --int8  -> runs/x/weights/best.int8.onnx (resforge.quantize)

Artifacts take float32 (B, C, H, W) normalised images with a dynamic batch axis and return
(B, K) logits. Class names and preprocessing (input size, mean/std, resize mode) travel inside
them: ONNX `metadata_props["resforge_meta"]`, TorchScript extra file `resforge_meta.json`.

Parity check (every export, before the artifact is moved into place): real sample images
(the run's own held-out data, else --samples files, else random inputs with a warning) go
through eager PyTorch and the exported model at batch sizes 1, 15 and 48 (the last is
the held-out batch); logits must agree within 1e-4 and the top-1 class must be
identical everywhere, otherwise ExportError and no artifact is left behind.
The 1e-4 is absolute while the largest |logit| is <= 100; beyond that it becomes 1e-6 of the
largest |logit| (8 float32 ulps), because a few ulps of a logit of 900 (an overconfident
model) already exceed 1e-4 whatever the runtime does.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resforge import __version__
from resforge.artifact import validate_meta
from resforge.backends import EXPORT_SUFFIX, META_FILE, META_KEY, missing_extra
from resforge.atomic import finish_temporary, temporary_for
from resforge.progress import track

log = logging.getLogger(__name__)

FORMATS = tuple(EXPORT_SUFFIX)
ATOL = 1e-4            # max |logit difference| allowed in fp32 ...
RTOL = 1e-6            # ... or this fraction of the largest |logit|, if larger (see above)
N_SAMPLES = 64         # 1 + 15 (parity batch) + 48 (held-out batch)
ONNX_OPSET = 17
# What a consumer needs to run the artifact; the full training config stays in the run folder.
_META_KEYS = ("model", "class_names", "input_size", "mean", "std", "metrics", "epoch",
              "resforge_version", "data", "split_hash", "source_format", "preprocessing",
              "ood")       # the OOD threshold: served exports flag unfamiliar images as the weights do


class ExportError(ValueError):
    """The exported model does not reproduce eager PyTorch (or could not be written)."""


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float      # over every sample, all logits
    limit: float             # the bound it had to meet: max(ATOL, RTOL * max |logit|)
    top1_agreement: float    # fraction of samples whose top-1 class is identical (must be 1.0)
    n_samples: int
    samples: str             # where the parity inputs came from
    seconds: float
    quantization: dict | None = None   # int8 exports: the accuracy check's record (resforge.quantize)
    quantization_summary: str = ""     # ... and its line (quantize.describe), printed under the parity line

    def summary(self) -> str:
        q = self.quantization
        parity = "parity of the fp32 ONNX (before quantisation)" if q else "parity"
        text = (f"exported {self.format}{' int8' if q else ''} -> {self.path} "
                f"({self.path.stat().st_size / 1e6:.1f} MB, {self.seconds:.1f}s)\n{parity} vs eager PyTorch on "
                f"{self.n_samples} {self.samples}: max |logit diff| {self.max_abs_diff:.2e} "
                f"({limit_text(self.limit)}), top-1 identical {100 * self.top1_agreement:.1f}%")
        if self.quantization_summary:
            text += "\n" + self.quantization_summary
        return text


def export(source: str | Path, format: str = "onnx", out: str | Path | None = None, *,
           model_name: str | None = None, samples: list[str | Path] | None = None,
           atol: float = ATOL) -> ExportResult:
    """Export a run folder / checkpoint / weights file; see the module docstring.
    (int8 ONNX: resforge.quantize.export_int8_from, or resforge.api.export(..., int8=...).)"""
    from resforge.checkpoint import load_for_inference
    from resforge.weightfile import resolve_weights

    _check_format(format)
    model, meta = load_for_inference(source, model_name=model_name)
    out = Path(out) if out else resolve_weights(source).with_suffix(EXPORT_SUFFIX[format])
    inputs, origin = sample_inputs(meta, samples)
    return export_model(model, meta, format, out, inputs=inputs, origin=origin, atol=atol)


def ensure_export(source, format: str, *, model_name: str | None = None) -> Path:
    """The artifact next to the weights if it is newer than them, else a fresh export."""
    from resforge.weightfile import resolve_weights

    weights = resolve_weights(source)
    path = weights.with_suffix(EXPORT_SUFFIX[format])
    if path.is_file() and path.stat().st_mtime >= weights.stat().st_mtime:
        return path
    if not os.access(path.parent, os.W_OK):          # read-only run folder: a private copy
        path = Path(tempfile.mkdtemp(prefix="resforge-export-")) / path.name
    result = export(source, format, path, model_name=model_name)
    log.warning("%s", result.summary())
    return result.path


def export_model(model: torch.nn.Module, meta: dict, format: str, out: str | Path, *,
                 inputs: np.ndarray | None = None, origin: str = "random inputs",
                 atol: float = ATOL) -> ExportResult:
    """Write `model` as `format` to `out` after the parity check passed on `inputs`
    (float32 (N, C, H, W) normalised; random when None)."""
    _check_format(format)
    t0 = time.perf_counter()
    out = Path(out)
    artifact_meta = validate_meta(export_meta(meta, format), f"the metadata for {out}", format)
    model = model.eval().float().to("cpu", memory_format=torch.contiguous_format)
    if inputs is None:
        inputs, origin = _random_inputs(meta, N_SAMPLES), "random inputs"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(out)
    try:
        example = torch.from_numpy(inputs[:2].copy())     # batch 2: a traced batch of 1 may specialise
        (_write_onnx if format == "onnx" else _write_torchscript)(model, example, tmp, artifact_meta)
        diff, limit, agree = check_parity(model, _open(tmp, format), inputs, atol)
        finish_temporary(tmp, out)                          # only a checked artifact gets the name
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, format, diff, limit, agree, len(inputs), origin, time.perf_counter() - t0)


def export_meta(meta: dict, format: str) -> dict:
    """What travels inside the artifact: classes, preprocessing and provenance."""
    kept = {k: meta[k] for k in _META_KEYS if k in meta}
    return {**kept, "format": format, "exported_by": __version__,
            "resize": meta.get("resize", "shorter-center-crop"),
            "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "batch": "dynamic",
                      "normalisation": "(pixel / 255 - mean) / std"},
            "output": {"name": "logits", "shape": ["batch", len(meta["class_names"])]}}


# ---------------------------------------------------------------- writers


def _write_onnx(model, example: torch.Tensor, path: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise missing_extra("onnx", "onnx") from None
    # The TorchScript-based exporter (dynamo=False) needs no onnxscript and handles these
    # convnets completely; dynamic_axes makes the batch axis symbolic.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # its deprecation notice and constant-folding chatter
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], opset_version=ONNX_OPSET, do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    embed_onnx_meta(proto, meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def embed_onnx_meta(proto, meta: dict) -> None:
    """Replace the metadata_props of an ONNX ModelProto with resforge's: the meta JSON, plus its
    main fields one per key for tools that show metadata (Netron, onnx.load)."""
    del proto.metadata_props[:]
    entries = {META_KEY: json.dumps(meta), "class_names": json.dumps(meta["class_names"]),
               "input_size": json.dumps(meta["input_size"]), "mean": json.dumps(meta["mean"]),
               "std": json.dumps(meta["std"]), "resize": meta["resize"],
               "architecture": meta["model"]["name"], "resforge_version": __version__}
    if meta.get("quantization"):
        entries["quantization"] = json.dumps(meta["quantization"])
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.doc_string = "resforge", f"{meta['model']['name']} exported by resforge"


def _write_torchscript(model, example: torch.Tensor, path: Path, meta: dict) -> None:
    # trace (not script): the models are plain feed-forward graphs; freeze folds the weights
    # in as constants (BN stays separate, so fp32 results match eager closely).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # torch.jit deprecation notices
        traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta)})


def _open(path: Path, format: str):
    from resforge.backends import OnnxBackend, TorchScriptBackend
    return OnnxBackend(path) if format == "onnx" else TorchScriptBackend(path)


# ---------------------------------------------------------------- parity


def parity_batches(n: int) -> list[slice]:
    """Batch sizes 1, 15 and the rest: the dynamic axis is exercised at three sizes, and the
    last (held-out) batch was never the export's example input."""
    cuts = [0, 1, min(16, n), n]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def limit_text(limit: float, atol: float = ATOL, rtol: float = RTOL) -> str:
    """The bound applied and the rule behind it, in the README's words (Deployment: Export), so
    a printed 2.4e-04 is not mistaken for a broken 1e-4 rule."""
    sci = lambda x: f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")  # 1e-04 -> 1e-4
    why = f" = {sci(rtol)} x max |logit| {limit / rtol:.0f}" if limit > atol else ""
    return (f"limit {limit:.1e}{why}; rule: <= {sci(atol)}, or {sci(rtol)} of the largest |logit| "
            f"once that exceeds {atol / rtol:.0f}")


def check_parity(model: torch.nn.Module, exported, inputs: np.ndarray,
                 atol: float = ATOL, rtol: float = RTOL) -> tuple[float, float, float]:
    """(max |logit diff|, its limit, top-1 agreement) of `exported` (np -> np logits) against
    eager fp32 PyTorch; raises ExportError when either is off."""
    diffs, same, peak = [], [], 0.0
    for s in track(parity_batches(len(inputs)), "checking export parity", unit="batch"):
        x = np.ascontiguousarray(inputs[s], dtype=np.float32)
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).float().numpy()          # (b, K)
        got = np.asarray(exported(x), dtype=np.float32)
        if got.shape != want.shape:
            raise ExportError(f"exported model returned logits of shape {got.shape} for a batch of "
                              f"{len(x)}, eager PyTorch {want.shape}: the batch axis is not dynamic")
        diffs.append(float(np.abs(got - want).max()))
        peak = max(peak, float(np.abs(want).max()))
        same.append(got.argmax(1) == want.argmax(1))
    diff, agree, limit = max(diffs), float(np.concatenate(same).mean()), max(atol, rtol * peak)
    if not diff <= limit or agree < 1.0:             # `not <=` also catches NaN
        raise ExportError(f"export parity failed: max |logit diff| {diff:.3e} ({limit_text(limit, atol, rtol)}), "
                          f"top-1 identical for {100 * agree:.1f}% of {len(inputs)} samples (must be "
                          "100%); the artifact was not written. Report this with the model name "
                          "and torch/onnx versions")
    return diff, limit, agree


# ---------------------------------------------------------------- sample inputs


def sample_inputs(meta: dict, samples: list[str | Path] | None = None, n: int = N_SAMPLES) -> tuple[np.ndarray, str]:
    """float32 (N, C, H, W) normalised parity inputs and a phrase saying where they came from."""
    from resforge.infer import Preprocess, expand_inputs

    prep = Preprocess(meta)
    if samples:
        files = expand_inputs(samples)[:n]
        arrays = [a for a in (prep.load(f) for f in files) if not isinstance(a, str)]
        if len(arrays) < 2:
            raise ValueError(f"--samples {samples} gave {len(arrays)} readable images; need at least 2")
        return prep.batch(arrays), f"images from {', '.join(map(str, samples))}"
    arrays, origin = _run_data(meta, prep, n)
    if arrays is not None:
        return prep.batch(arrays), origin
    log.warning("export parity check on random inputs: %s; pass --samples FOLDER for real images",
                origin)
    return _random_inputs(meta, n), "random inputs"


def _run_data(meta: dict, prep, n: int) -> tuple[list[np.ndarray] | None, str]:
    """Up to n held-out images (test, else val, else train split) of the run's own data."""
    cfg_dict = meta.get("config")
    if not cfg_dict or not cfg_dict.get("data", {}).get("source"):
        return None, "the checkpoint does not name its training data"
    spec = cfg_dict["data"]["source"]
    try:
        from resforge.pipeline import prepare_data
        from resforge.config import load_config
        bundle, _ = prepare_data(load_config(None, {"data.download": False}, base=cfg_dict))
    except Exception as e:  # noqa: BLE001 — missing/moved data must not block an export
        return None, f"its data {spec!r} could not be loaded ({type(e).__name__}: {e})"
    return held_out_arrays(bundle, prep, n, spec)


def held_out_arrays(bundle, prep, n: int, spec: str) -> tuple[list[np.ndarray] | None, str]:
    """Up to n (H, W, C) uint8 images, evenly spaced over the test (else val, else train) split
    of a loaded data bundle, and where they came from; (None, why) when none fit the model."""
    for name in ("test", "val", "train"):
        split = bundle.splits.get(name)
        if split is None or len(split.labels) < 2:
            continue
        idx = np.linspace(0, len(split.labels) - 1, num=min(n, len(split.labels))).astype(np.int64)
        if split.images is not None:     # uint8 (N, C, H, W) at the training size
            arrays = [np.ascontiguousarray(np.asarray(split.images[i]).transpose(1, 2, 0)) for i in idx]
            if arrays[0].shape != (prep.height, prep.width, prep.channels):
                return None, (f"its data {spec!r} is stored at {arrays[0].shape} (H, W, C), the model "
                              f"takes {(prep.height, prep.width, prep.channels)}")
        else:                            # streamed folder split: decode its files
            arrays = [a for a in (prep.load(split.files[i]) for i in idx) if not isinstance(a, str)]
        if len(arrays) >= 2:
            return arrays, f"{name} images of {bundle.name}"
    return None, f"its data {spec!r} has no usable images"


def _random_inputs(meta: dict, n: int) -> np.ndarray:
    c, h, w = (int(v) for v in meta["input_size"])
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, h, w, generator=g).numpy()


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")

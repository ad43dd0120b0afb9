"""Inference backends behind one call: float32 (B, C, H, W) normalised -> float32 (B, K) logits.

    torch        eager PyTorch on a run folder / resforge checkpoint / third-party weights
    torchscript  a `resforge export --format torchscript` artifact (*.torchscript)
    onnx         a `resforge export --format onnx` artifact, run by ONNX Runtime (*.onnx)

Every backend carries `meta` (class names, input size, mean/std, resize mode, metrics, ...),
read from the checkpoint sidecar or from the metadata embedded in the artifact, so callers
preprocess exactly as the model was trained (see infer.Preprocess). That meta is validated
when the artifact is opened, and one blank input must give finite (1, K) logits
(resforge.artifact): a bad artifact is refused at load, never answered with garbage.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from resforge import artifact

BACKENDS = ("torch", "torchscript", "onnx")
EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}
META_KEY = "resforge_meta"                 # ONNX metadata_props key holding the meta JSON
META_FILE = "resforge_meta.json"           # TorchScript extra file holding the same JSON


def missing_extra(package: str, extra: str) -> ImportError:
    """The error every lazy import of an optional dependency raises."""
    return ImportError(f"{package} is not installed; install it with `pip install resforge[{extra}]` "
                       f"(or `pip install '.[{extra}]'` from a checkout)")


class TorchBackend:
    """Eager PyTorch. channels_last: 1.2x faster at batch 64 on CPU (bench/inference_speed.py)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, meta: dict, *, device: str = "cpu", channels_last: bool = True):
        self.device = torch.device(device)
        self.channels_last = channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=fmt)
        self.meta = meta

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(t).float().cpu().numpy()


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: str | Path, *, device: str = "cpu"):
        extra = {META_FILE: ""}
        self.device = torch.device(device)
        with warnings.catch_warnings():     # torch>=2.9 marks torch.jit deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
            except RuntimeError as e:      # not a TorchScript archive, truncated, ...
                raise _unloadable(path, self.name, e) from None
        self.meta = _parse_meta(extra[META_FILE], path, self.name)
        artifact.check_finite_torchscript(self.module, path)
        artifact.check_outputs(self, self.meta, path, self.name)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            return self.module(t).float().cpu().numpy()


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_extra("onnxruntime", "onnx") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own, unexported exception types
            raise _unloadable(path, self.name, e) from None
        self.input_name = self.session.get_inputs()[0].name
        custom = self.session.get_modelmeta().custom_metadata_map
        self.meta = _parse_meta(custom.get(META_KEY, ""), path, self.name)
        artifact.check_graph([i.shape for i in self.session.get_inputs()],
                             [o.shape for o in self.session.get_outputs()], self.meta, path)
        artifact.check_finite_onnx(path, self.meta)
        artifact.check_outputs(self, self.meta, path, self.name)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


def _unloadable(path, fmt: str, e: Exception) -> artifact.ArtifactError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return artifact.ArtifactError(f"{path}: not a loadable {fmt} model ({first}); "
                                  f"{artifact.REMEDY[fmt]}")


def _parse_meta(text: str | bytes, path, fmt: str) -> dict:
    if not text:
        raise artifact.ArtifactError(f"{path} carries no resforge metadata ({META_KEY}): it was not "
                                     "written by `resforge export`; export the run again with "
                                     "`resforge export RUN`")
    return artifact.parse_meta_text(text, path, fmt)


def artifact_format(path: str | Path) -> str | None:
    """'onnx' / 'torchscript' for an exported artifact's file name, else None."""
    suffix = Path(path).suffix.lower()
    return next((f for f, s in EXPORT_SUFFIX.items() if s == suffix), None)


def load_backend(source: str | Path, backend: str = "auto", *, model_name: str | None = None,
                 device: str = "cpu", threads: int | None = None):
    """A ready backend for a run folder, checkpoint, weights file or exported artifact.

    backend "auto": what the source is (artifact -> its runtime, weights -> torch). A run or
    checkpoint with backend onnx/torchscript is exported on first use (parity-checked) and
    the artifact next to its weights is reused afterwards.
    threads: CPU threads for the model (torch's setting is process-wide); default: the
    runtime's own choice (one per core). Fewer threads per process suit several replicas
    per host, and shared or oversubscribed CPUs.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")
    fmt = artifact_format(source)
    if fmt is not None:
        if not Path(source).is_file():
            raise FileNotFoundError(f"exported model not found: {source}")
        if backend not in ("auto", fmt):
            raise ValueError(f"{source} is a {fmt} export; it cannot run on the {backend} backend: "
                             f"pass --backend {fmt} or the run folder it was exported from")
        return _open_artifact(source, fmt, device, threads)
    if backend in ("auto", "torch"):
        from resforge.checkpoint import load_for_inference
        model, meta = load_for_inference(source, model_name=model_name, device=device)
        return TorchBackend(model, meta, device=device)
    from resforge.export import ensure_export
    return _open_artifact(ensure_export(source, backend, model_name=model_name), backend, device, threads)


def _open_artifact(path, fmt: str, device: str, threads: int | None = None):
    return OnnxBackend(path, threads=threads) if fmt == "onnx" else TorchScriptBackend(path, device=device)

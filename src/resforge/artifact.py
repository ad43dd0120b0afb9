"""Everything resforge reads back from an artifact, validated in one place.

    checkpoint sidecar   <stem>.json beside <stem>.safetensors          read_sidecar, check_weights
    exported artifacts   ONNX metadata_props["resforge_meta"],          validate_meta(kind="onnx" /
                         TorchScript extra file resforge_meta.json      "torchscript"), check_graph
    split manifest       splits.json                                    read_manifest
    resume state         last.state.pt                                  load_state
    any loaded model     one blank input -> finite (1, K) logits        check_outputs

Whoever hands over an artifact also writes its sha256, so nothing in it is trusted: types,
ranges and agreement with the tensors are checked once, when it is loaded, and every problem
is one ArtifactError (a ValueError) naming the file, the field and what to do. No other
exception escapes these checks, whatever JSON they are given (tests/test_artifact_hostile.py).

Limits, settable through the environment (read at every check):
    RESFORGE_MAX_IMAGE_SIDE  (4096)     largest input height / width an artifact may declare (the data limit too)
    RESFORGE_MAX_CLASSES     (100000)   most classes (outputs) an artifact may declare
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from resforge.weights import WeightsError, read_torch_file

FORMAT = "resforge-checkpoint"             # the sidecar's "format"
FORMAT_VERSION = 1                         # the newest sidecar layout this resforge reads
DEFAULT_MAX_IMAGE_SIDE = 4096
DEFAULT_MAX_CLASSES = 100_000
MAX_IN_CHANS = 64
MAX_NAME_CHARS = 256                       # longest class name
MIN_STD = 1e-6                             # below this, normalised pixels overflow float32
MAX_STAT = 255.0                           # mean/std live on the 0..1 or the 0..255 scale
KINDS = ("checkpoint", "onnx", "torchscript", "weights")
REMEDY = {  # what to do, per kind of artifact
    "checkpoint": "restore the file from the run that wrote it, or train again",
    "onnx": "export the run again with `resforge export RUN --format onnx`",
    "torchscript": "export the run again with `resforge export RUN --format torchscript`",
    "weights": "pass weights of a resforge architecture (see `resforge models`)",
    "manifest": "restore it from the run, or delete it to make new splits",
    "state": "delete it to restart the run from epoch 0, or resume from an intact copy of the run",
}


class ArtifactError(WeightsError):
    """An artifact is malformed, out of bounds, or disagrees with its own weights or graph."""


def limit(name: str) -> int:
    """The limit `name` ("max_image_side" | "max_classes"): RESFORGE_<NAME> or its default."""
    default = {"max_image_side": DEFAULT_MAX_IMAGE_SIDE, "max_classes": DEFAULT_MAX_CLASSES}[name]
    env = f"RESFORGE_{name.upper()}"
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ArtifactError(f"environment variable {env}={raw!r} must be a positive integer (default {default})")
    return int(raw)


class _Check:
    """The file and the remedy every message about one artifact ends with."""

    def __init__(self, source, kind: str):
        self.source, self.fix = source, REMEDY[kind]

    def fail(self, field: str, problem: str, fix: str | None = None):
        raise ArtifactError(f"{self.source}: {field} {problem}; {fix or self.fix}")

    def obj(self, value, field: str, *, optional: bool = False) -> dict:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, {_found(value)}")
        return value

    def integer(self, value, field: str, lo: int, hi: int | None = None) -> int:
        if not _is_int(value):
            self.fail(field, f"must be an integer, {_found(value)}")
        if value < lo or (hi is not None and value > hi):
            self.fail(field, f"is {value}, outside {lo}..{hi}" if hi is not None else f"is {value}, below {lo}")
        return value

    def real(self, value, field: str, lo: float, hi: float) -> float:
        if not _is_real(value):
            self.fail(field, f"must be a number, {_found(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(field, f"is {value}, not a finite number")
        if abs(value) > 1e300:          # a 400-digit integer: float() of it would overflow
            self.fail(field, f"is {_show(value)}, far out of range")
        if not lo <= value <= hi:
            self.fail(field, f"is {value}, outside [{lo:g}, {hi:g}]")
        return float(value)

    def text(self, value, field: str, max_chars: int = 4096) -> str:
        if not isinstance(value, str):
            self.fail(field, f"must be a string, {_found(value)}")
        if len(value) > max_chars:
            self.fail(field, f"is {len(value)} characters long, more than {max_chars}")
        return value

    def items(self, value, field: str, n: int | None = None) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, {_found(value)}")
        if n is not None and len(value) != n:
            self.fail(field, f"has {len(value)} entries, expected {n}")
        return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), f"a {type(v).__name__}")


def _found(v) -> str:
    return "it is missing" if v is None else f"found {_show(v)}"


def _show(v) -> str:
    if v is None:
        return "null"
    text = repr(v)
    return f"{_kind(v)} {text if len(text) <= 60 else text[:57] + '...'}"


# ---------------------------------------------------------------- metadata


def validate_meta(meta: Any, source, kind: str = "checkpoint") -> dict:
    """`meta` if it is sound metadata of a `kind` artifact, else ArtifactError.

    kind: "checkpoint" (sidecar), "onnx" / "torchscript" (embedded in an export), or "weights"
    (derived by resforge from a third-party file's tensors)."""
    c = _Check(source, kind)
    c.obj(meta, "the metadata")
    if kind == "checkpoint":
        if meta.get("format") != FORMAT:
            c.fail("format", f"is {_show(meta.get('format'))}, not {FORMAT!r}")
        version = meta.get("format_version", FORMAT_VERSION)
        if _is_int(version) and version > FORMAT_VERSION:
            c.fail("format_version", f"is {version}: written by a newer resforge (this one reads "
                                     f"{FORMAT_VERSION})", "upgrade resforge to load it")
        c.integer(version, "format_version", 1, FORMAT_VERSION)
        sha = meta.get("weights_sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            c.fail("weights_sha256", f"must be 64 lowercase hex digits, found {_show(sha)}")
    elif kind in ("onnx", "torchscript"):
        if meta.get("format") != kind:
            c.fail("format", f"is {_show(meta.get('format'))}, but the file is a {kind} export")
    _validate_model(c, meta)
    _validate_preprocessing(c, meta, required_resize=kind in ("onnx", "torchscript"))
    _validate_extras(c, meta)
    _validate_ood(c, meta)
    _validate_quantization(c, meta, kind)
    return meta


def _validate_model(c: _Check, meta: dict) -> None:
    from resforge.models import check_settings, list_models

    m = c.obj(meta.get("model"), "model")
    name = c.text(m.get("name"), "model.name", 64)
    if name not in list_models():
        c.fail("model.name", f"is {name!r}, not a resforge architecture (see `resforge models`)")
    most = limit("max_classes")
    if _is_int(m.get("num_classes")) and m["num_classes"] > most:
        c.fail("model.num_classes", f"is {m['num_classes']}, above the limit of {most} classes",
               "set RESFORGE_MAX_CLASSES higher if that many are really meant")
    k = c.integer(m.get("num_classes"), "model.num_classes", 1, most)
    c.integer(m.get("in_chans"), "model.in_chans", 1, MAX_IN_CHANS)
    problem = check_settings(name, c.obj(m.get("kwargs"), "model.kwargs", optional=True))
    if problem:
        c.fail("model.kwargs", problem)
    names = c.items(meta.get("class_names"), "class_names")
    if len(names) != k:
        c.fail("class_names", f"has {len(names)} names but model.num_classes is {k}")
    for i, n in enumerate(names):
        c.text(n, f"class_names[{i}]", MAX_NAME_CHARS)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        c.fail("class_names", f"lists {dup!r} more than once: every output needs its own name")
    out = meta.get("output")
    if out is not None:
        shape = c.items(c.obj(out, "output").get("shape"), "output.shape", 2)
        if shape[1] != k:
            c.fail("output.shape", f"says {shape[1]!r:.40} logits but there are {k} classes")


def _validate_preprocessing(c: _Check, meta: dict, required_resize: bool) -> None:
    from resforge.data.images import RESIZE_MODES

    ch = meta["model"]["in_chans"]
    size = c.items(meta.get("input_size"), "input_size", 3)
    if size[0] != ch or not _is_int(size[0]):
        c.fail("input_size[0] (channels)", f"is {size[0]!r:.40} but model.in_chans is {ch}")
    side = limit("max_image_side")
    for i, what in ((1, "height"), (2, "width")):
        if _is_int(size[i]) and size[i] > side:
            c.fail(f"input_size[{i}] ({what})", f"is {size[i]}, above the limit of {side} pixels",
                   "set RESFORGE_MAX_IMAGE_SIDE higher if that size is really meant")
        c.integer(size[i], f"input_size[{i}] ({what})", 1, side)
    for key, lo in (("mean", -MAX_STAT), ("std", MIN_STD)):
        values = c.items(meta.get(key), key)
        if len(values) != ch:
            c.fail(key, f"has {len(values)} values but the model takes {ch} channels (model.in_chans)")
        for i, v in enumerate(values):
            c.real(v, f"{key}[{i}]", lo, MAX_STAT)
    if "resize" in meta or required_resize:
        if meta.get("resize") not in RESIZE_MODES:
            c.fail("resize", f"is {_show(meta.get('resize'))}, not one of {', '.join(RESIZE_MODES)}")


def _validate_extras(c: _Check, meta: dict) -> None:
    """Provenance fields: not used for computing, but shown and passed on, so typed."""
    for key in ("config", "data", "finetune", "continual", "input", "preprocessing"):
        if key in meta:
            c.obj(meta[key], key)
    for key in ("split_hash", "source_format", "resforge_version", "exported_by"):
        if meta.get(key) is not None:
            c.text(meta[key], key, 256)
    if meta.get("epoch") is not None:
        c.integer(meta["epoch"], "epoch", 0)
    for k, v in c.obj(meta.get("metrics"), "metrics", optional=True).items():
        if v is not None and not isinstance(v, (str, int, float)):
            c.fail(f"metrics.{k}", f"must be a number, found {_show(v)}")


def _validate_ood(c: _Check, meta: dict) -> None:
    """The optional OOD threshold (resforge.ood): predict --ood and serve compare scores with it."""
    from resforge.ood import SCORES

    if meta.get("ood") is None:
        return
    o = c.obj(meta["ood"], "ood")
    if o.get("score") not in SCORES:
        c.fail("ood.score", f"is {_show(o.get('score'))}, not one of {', '.join(SCORES)}")
    c.real(o.get("threshold"), "ood.threshold", -1e30, 1e30)
    rate = c.real(o.get("accept_rate"), "ood.accept_rate", 0.0, 1.0)
    if not 0 < rate < 1:
        c.fail("ood.accept_rate", f"is {rate}, not strictly between 0 and 1")
    if o.get("temperature") is not None:
        if c.real(o["temperature"], "ood.temperature", 0.0, 1e6) <= 0:
            c.fail("ood.temperature", "is 0, must be > 0")
    if o.get("fitted_on") is not None:
        c.text(o["fitted_on"], "ood.fitted_on", 64)
    if o.get("n") is not None:
        c.integer(o["n"], "ood.n", 1)


QUANT_DTYPES = ("int8",)
MAX_TOLERANCE = 100.0                      # percentage points of top-1


def _validate_quantization(c: _Check, meta: dict, kind: str) -> None:
    """The optional record of an int8 export (resforge.quantize): what was quantised, on what it
    was calibrated, and the accuracy check it passed. Shown by serve (/v1/model) and the CLI, so
    typed; and it must not claim an accuracy outside its own tolerance."""
    if meta.get("quantization") is None:
        return
    q = c.obj(meta["quantization"], "quantization")
    if kind != "onnx":
        c.fail("quantization", f"is recorded in a {kind} artifact; only ONNX exports are quantised")
    if q.get("dtype") not in QUANT_DTYPES:
        c.fail("quantization.dtype", f"is {_show(q.get('dtype'))}, not one of {', '.join(QUANT_DTYPES)}")
    for key in ("method", "split"):
        c.text(q.get(key), f"quantization.{key}", 64)
    for key in ("activations", "weights", "calibration_split", "data", "onnxruntime"):
        if q.get(key) is not None:
            c.text(q[key], f"quantization.{key}", 256)
    c.integer(q.get("calibration_images"), "quantization.calibration_images", 1)
    c.integer(q.get("n"), "quantization.n", 1)
    fp32, int8 = (c.real(q.get(k), f"quantization.{k}", 0.0, 1.0) for k in ("fp32_top1", "int8_top1"))
    c.real(q.get("top1_agreement"), "quantization.top1_agreement", 0.0, 1.0)
    tol = c.real(q.get("tolerance"), "quantization.tolerance", 0.0, MAX_TOLERANCE)
    if 100 * (fp32 - int8) > tol + 1e-9:
        c.fail("quantization.int8_top1", f"is {int8:.4f}, more than the recorded tolerance of {tol:g} points "
                                         f"below fp32_top1 {fp32:.4f}: the record does not describe an export "
                                         "that passed its accuracy check",
               "export the run again with `resforge export RUN --format onnx --int8`")


def parse_meta_text(text: str | bytes, source, kind: str) -> dict:
    """JSON text embedded in an export -> validated meta."""
    c = _Check(source, kind)
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        c.fail("its resforge metadata", f"is not valid JSON ({str(e)[:120]})")
    return validate_meta(meta, source, kind)


def read_sidecar(weights: Path, blob: bytes | None = None, *, required: bool = False) -> dict | None:
    """The validated sidecar of a resforge checkpoint; None when there is no resforge sidecar
    (none at all, or a JSON file of someone else's). `blob`: the weights file's bytes if read
    already (its sha256 is checked against the sidecar's). required: the weights say resforge
    wrote them, so a JSON file beside them must be a sound sidecar."""
    weights = Path(weights)
    sidecar = weights.with_suffix(".json")
    if not sidecar.is_file():
        return None
    c = _Check(sidecar, "checkpoint")
    try:
        meta = json.loads(sidecar.read_bytes())
    except (ValueError, RecursionError) as e:
        c.fail("the sidecar", f"is not valid JSON ({str(e)[:120]})")
    except OSError as e:
        c.fail("the sidecar", f"cannot be read ({e.strerror or e})")
    if not required and not (isinstance(meta, dict) and meta.get("format") == FORMAT):
        return None
    if not isinstance(meta, dict):
        c.fail("the sidecar", f"must be a JSON object, {_found(meta)}")
    want = meta.get("weights_sha256")
    if isinstance(want, str):       # a torn pair first: the most likely cause of any mismatch
        got = hashlib.sha256(blob if blob is not None else weights.read_bytes()).hexdigest()
        if got != want:
            raise ArtifactError(f"{weights} does not match its sidecar {sidecar.name} (sha256 differs): "
                                "the pair was torn or edited; use the other checkpoint (last/best) of the run")
    return validate_meta(meta, f"checkpoint sidecar {sidecar}", "checkpoint")


# ---------------------------------------------------------------- tensors and outputs


def nonfinite_tensor(state_dict: dict) -> str | None:
    """The first key whose floating-point tensor holds NaN or inf, else None."""
    for key, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


def check_weights(state_dict: dict, meta: dict, source, kind: str = "checkpoint") -> None:
    """The tensors agree with the metadata: head rows = num_classes, stem channels = in_chans."""
    from resforge.weights import HEAD_KEYS, STEM_KEY

    c = _Check(source, kind)
    m = meta["model"]
    head, stem = state_dict.get(HEAD_KEYS[0]), state_dict.get(STEM_KEY)
    if head is not None and (head.dim() != 2 or head.shape[0] != m["num_classes"]):
        c.fail("model.num_classes", f"is {m['num_classes']} but the weights' classifier "
                                    f"({HEAD_KEYS[0]}) has shape {list(head.shape)}")
    if stem is not None and (stem.dim() != 4 or stem.shape[1] != m["in_chans"]):
        c.fail("model.in_chans", f"is {m['in_chans']} but the weights' stem ({STEM_KEY}) has shape "
                                 f"{list(stem.shape)}")


def check_outputs(run: Callable[[np.ndarray], np.ndarray], meta: dict, source, kind: str) -> None:
    """One blank (mean-image) input of meta's input_size must give finite (1, K) logits:
    proves the model, its input size and its class list fit together before anything is
    served, predicted or exported."""
    c = _Check(source, kind)
    x = np.zeros((1, *meta["input_size"]), dtype=np.float32)
    try:
        y = np.asarray(run(x))
    except Exception as e:  # noqa: BLE001 — any runtime's failure means the same: sizes disagree
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        c.fail("input_size", f"{list(meta['input_size'])} does not fit the model ({type(e).__name__}: {first})")
    k = len(meta["class_names"])
    if y.shape != (1, k):
        c.fail("class_names", f"has {k} names but the model returns logits of shape {list(y.shape)} "
                              "for one image")
    if not np.isfinite(y).all():
        c.fail("the weights", "give non-finite logits (NaN or inf) for a blank image")


def check_finite_onnx(path, meta: dict | None = None) -> None:
    """Every float initializer of an ONNX file is finite. (A probe alone is not enough:
    onnxruntime's kernels can turn a NaN weight into finite but wrong logits.) With `meta`: a
    file whose meta records int8 quantisation must hold a quantised (QDQ) graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:          # onnxruntime without onnx: the probe in check_outputs remains
        return
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 — protobuf's DecodeError and friends
        _Check(path, "onnx").fail("the file", f"is not an ONNX model ({type(e).__name__})")
    for t in proto.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            if not np.isfinite(numpy_helper.to_array(t)).all():
                _Check(path, "onnx").fail(f"initializer {t.name}", "holds NaN or inf")
    if meta is not None and meta.get("quantization") is not None:
        if not any(n.op_type == "DequantizeLinear" for n in proto.graph.node):
            _Check(path, "onnx").fail("quantization", "says the model is int8 but its graph has no "
                                                      "DequantizeLinear node (a float32 graph)")


def check_finite_torchscript(module, path) -> None:
    """Every float tensor of a TorchScript module (parameters, or constants once frozen) is finite."""
    tensors = dict(module.state_dict())
    for node in module.graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
            tensors[f"constant %{node.output().debugName()}"] = node.output().toIValue()
    bad = nonfinite_tensor(tensors)
    if bad is not None:
        _Check(path, "torchscript").fail(f"tensor {bad}", "holds NaN or inf")


def check_graph(inputs: list, outputs: list, meta: dict, source) -> None:
    """ONNX graph signature (name, shape) lists vs meta: (batch, C, H, W) -> (batch, K)."""
    c = _Check(source, "onnx")
    if len(inputs) != 1 or len(outputs) < 1:
        c.fail("the graph", f"has {len(inputs)} inputs and {len(outputs)} outputs; resforge exports have 1 and 1")
    shape, want = list(inputs[0]), [meta["input_size"][0], *meta["input_size"][1:]]
    if len(shape) != 4:
        c.fail("the graph", f"input has shape {shape}; resforge exports take (batch, C, H, W)")
    for dim, have, field in zip(shape[1:], want, ("model.in_chans", "input_size[1]", "input_size[2]")):
        if _is_int(dim) and dim != have:
            c.fail(field, f"says {list(meta['input_size'])} but the graph takes inputs of shape {shape}")
    out = list(outputs[0])
    k = len(meta["class_names"])
    if len(out) != 2 or (_is_int(out[1]) and out[1] != k):
        c.fail("class_names", f"has {k} names but the graph returns logits of shape {out}")


# ---------------------------------------------------------------- split manifest


def read_manifest(path) -> dict:
    """splits.json -> {"splits": {name: [id, ...]}, "hash": ..., ...}, checked against its hash."""
    from resforge.data.splits import manifest_hash

    c = _Check(path, "manifest")
    try:
        m = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:
        c.fail("the split manifest", f"is not valid JSON ({str(e)[:120]})")
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read split manifest ({e.strerror or e})") from None
    c.obj(m, "the split manifest")
    splits = c.obj(m.get("splits"), "splits")
    for name, ids in splits.items():
        c.text(name, "a split name", 64)
        for i, item in enumerate(c.items(ids, f"splits.{name}")):
            if not isinstance(item, str):
                c.fail(f"splits.{name}[{i}]", f"must be an item id (a string), found {_show(item)}")
    if m.get("hash") != manifest_hash(splits):
        c.fail("hash", "does not match its splits (edited by hand?)",
               "re-save it with save_manifest or make a new one")
    for key in ("source", "fingerprint"):
        if m.get(key) is not None:
            c.text(m[key], key, 1024)
    if m.get("seed") is not None:
        c.integer(m["seed"], "seed", 0)
    for key in ("val_fraction", "train_fraction"):
        if m.get(key) is not None:
            c.real(m[key], key, 0.0, float(2 ** 63))
    return m


# ---------------------------------------------------------------- resume state


def load_state(path) -> dict:
    """last.state.pt -> the resume state, read with torch.load(weights_only=True) (no code runs)
    and checked to have the layout training/loop.py writes."""
    path = Path(path)
    state = read_torch_file(path, what="resume state", fix=REMEDY["state"].capitalize() + ".")
    validate_state(state, path)
    return state


def validate_state(state: Any, source) -> dict:
    from dataclasses import fields

    from resforge.training.loop import FitState

    c = _Check(source, "state")
    c.obj(state, "the resume state")
    fit = c.obj(state.get("fit_state"), "fit_state")
    known = {f.name for f in fields(FitState)}
    for key, value in fit.items():
        if key not in known:
            c.fail(f"fit_state.{key}", "is not a field of the training state")
        if key == "best":
            if value is not None and not _is_real(value):
                c.fail("fit_state.best", f"must be a number, {_found(value)}")
        elif key in ("seconds", "pass_seconds"):
            c.real(value, f"fit_state.{key}", 0.0, math.inf)
        elif key == "history":
            if not all(isinstance(row, dict) for row in c.items(value, "fit_state.history")):
                c.fail("fit_state.history", "must be a list of objects")
        else:
            c.integer(value, f"fit_state.{key}", 0)
    for key, optional in (("model", False), ("best_weights", True)):
        _tensor_dict(c, state.get(key), key, optional)
    for key, optional in (("optimizer", False), ("scheduler", False), ("ema", True),
                          ("lookahead", True), ("scaler", True)):
        if not (optional and state.get(key) is None):
            c.obj(state.get(key), key)
    opt = state["optimizer"]
    c.obj(opt.get("state"), "optimizer.state")
    c.items(opt.get("param_groups"), "optimizer.param_groups")
    rng = c.obj(state.get("rng"), "rng")
    if not (isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8):
        c.fail("rng.torch", f"must be a uint8 tensor, found {_show(rng.get('torch'))}")
    if not all(isinstance(t, torch.Tensor) for t in c.items(rng.get("cuda", []), "rng.cuda")):
        c.fail("rng.cuda", "must be a list of tensors")
    return state


def _tensor_dict(c: _Check, value, field: str, optional: bool) -> None:
    if value is None and optional:
        return
    d = c.obj(value, field)
    if not d or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()):
        c.fail(field, "must be a non-empty mapping of parameter names to tensors")
    bad = nonfinite_tensor(d)
    if bad is not None:
        c.fail(f"{field}.{bad}", "holds NaN or inf")

"""resforge checkpoints: safetensors weights + a JSON sidecar that makes them self-describing.

    <dir>/best.safetensors   model state dict (fp32)
    <dir>/best.json          architecture, class names, preprocessing, resolved config,
                             split hash, metrics, resforge version, sha256 of the weights
    <dir>/last.state.pt      resume state (optimiser, scheduler, EMA, RNG, epoch): tensors and
                             plain containers only, read back with torch.load(weights_only=True)

Every file is written atomically (temporary file in the same folder, fsync, rename), so a
crash leaves the previous checkpoint intact, never a half-written one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from resforge import __version__
from resforge import artifact
from resforge.artifact import FORMAT, FORMAT_VERSION, ArtifactError  # noqa: F401 (re-exported)
from resforge.atomic import DiskFullError, atomic_write, atomic_write_text  # noqa: F401 (re-exported)
from resforge.models import create_model
from resforge.weightfile import imagenet_stats, read_weights_file
from resforge.weights import WeightsError, load_weights

log = logging.getLogger(__name__)

def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32, contiguous, CPU copies (safetensors refuses shared or strided storage)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


def save_checkpoint(stem: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write <stem>.safetensors then <stem>.json; the sidecar names the weights' sha256, so a
    pair torn by a crash between the two renames is detected on load."""
    stem = Path(stem)
    blob = st_save(_plain_state(model), metadata={"format": "pt", "resforge": FORMAT})
    atomic_write(stem.with_suffix(".safetensors"), blob)
    sidecar = {"format": FORMAT, "format_version": FORMAT_VERSION, "resforge_version": __version__,
               **meta, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(sidecar, indent=2, default=_json_default))
    return stem.with_suffix(".safetensors")


def add_to_sidecars(folder: Path, model: nn.Module, fields: dict[str, Any]) -> list[Path]:
    """Merge `fields` into the sidecar of every checkpoint in `folder` whose tensors are exactly
    `model`'s; -> the sidecars rewritten (atomically). The weights files, hence their sha256, stay
    as they are. For what a run learns about its final weights after saving them (the OOD
    threshold fitted on the final evaluation): 'best' is written during training, and with
    train.restore_best=false or a BN recalibration the final model is 'best', 'last' or both, so
    the tensors decide, not the tags."""
    from safetensors.torch import load_file

    if not fields:
        return []
    state, done = _plain_state(model), []
    for weights in sorted(Path(folder).glob("*.safetensors")):
        meta = read_meta(weights)                  # verified against its weights and validated
        saved = load_file(weights) if meta else {}
        if saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items()):
            atomic_write_text(weights.with_suffix(".json"),
                              json.dumps({**meta, **fields}, indent=2, default=_json_default))
            done.append(weights.with_suffix(".json"))
    return done


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(Path(path), buf.getvalue())


def load_state(path: Path) -> dict:
    """The resume state, read without running code and checked (artifact.load_state)."""
    return artifact.load_state(path)


def read_meta(path: Path) -> dict:
    """The sidecar of a resforge checkpoint, verified against its weights file and validated
    (artifact.read_sidecar); {} when the weights have none."""
    return artifact.read_sidecar(Path(path)) or {}


def default_meta_for(model: nn.Module, fmt: str, class_names: list[str] | None, in_chans: int,
                     kwargs: dict | None = None) -> dict:
    """Preprocessing for third-party weights: both torchvision/timm and the akamaster CIFAR
    nets were trained on ImageNet-normalised inputs. The meta says it was assumed."""
    cfg = model.default_cfg
    k = model.fc.out_features if hasattr(model, "fc") else None
    mean, std = imagenet_stats(in_chans)
    return {"model": {"name": cfg["arch"], "num_classes": k, "in_chans": in_chans, "kwargs": dict(kwargs or {})},
            "class_names": class_names or [str(i) for i in range(k)],
            "input_size": [in_chans, *cfg["input_size"][1:]], "mean": mean, "std": std,
            "source_format": fmt,
            "preprocessing": {"assumed": True, "why": "the weights file has no resforge sidecar",
                              "mean": mean, "std": std, "resize": "shorter-center-crop"}}


def load_for_inference(source, *, model_name: str | None = None, num_classes: int | None = None,
                       in_chans: int | None = None, class_names: list[str] | None = None,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Build the model a weights file describes and load it, in eval mode on `device`.

    resforge checkpoints carry everything; third-party files (torchvision/timm ImageNet
    ResNets, the akamaster CIFAR ResNets) need `model_name` unless their keys identify it
    (weightfile.read_weights_file). Either way the result is proven to fit its meta
    (artifact.check_outputs) before it is returned: a bad artifact fails here, not on the first image."""
    wf = read_weights_file(source, model_name)
    path, sd = wf.path, wf.state_dict
    if wf.fmt == "resforge":
        meta = wf.meta
        model = _build(path, wf.arch, wf.num_classes, wf.in_chans, wf.kwargs, sd, "checkpoint")
    else:
        name = wf.require_arch()
        k = num_classes or wf.num_classes
        c = in_chans or wf.in_chans
        if class_names is not None and len(class_names) != k:
            raise WeightsError(f"{path} has {k} outputs but {len(class_names)} class names were given")
        most = artifact.limit("max_classes")
        if k is not None and not 1 <= k <= most or not 1 <= c <= artifact.MAX_IN_CHANS:
            raise ArtifactError(f"{path}: {k} classes and {c} input channels are outside 1..{most} and "
                                f"1..{artifact.MAX_IN_CHANS}; {artifact.REMEDY['weights']}")
        model = _build(path, name, k, c, wf.kwargs, sd, "weights")
        # Class names of a third-party head come from the caller (evaluate takes the data's) or are
        # the output indices.
        meta = artifact.validate_meta({**default_meta_for(model, wf.fmt, class_names, c, wf.kwargs),
                                       "weights": str(path)}, path, "weights")
        log.warning("%s has no resforge sidecar: assuming ImageNet preprocessing (mean %s, std %s, "
                    "%dx%d); predictions are only right if the model was trained so", path,
                    _short(meta["mean"]), _short(meta["std"]), *meta["input_size"][1:])
    model = model.to(device).eval()
    artifact.check_outputs(lambda x: _run(model, x), meta, path, "checkpoint" if wf.fmt == "resforge" else "weights")
    return model, meta


def _short(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _build(path: Path, name: str, k: int, c: int, kwargs: dict, sd: dict, kind: str) -> nn.Module:
    """The registry model loaded with `sd`; a builder's complaint about the recorded settings
    becomes an ArtifactError about the file."""
    try:
        model = create_model(name, num_classes=k, in_chans=c, **kwargs)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: model {name} cannot be built from model.kwargs {kwargs} ({e}); "
                            f"{artifact.REMEDY[kind]}") from None
    load_weights(model, sd)
    return model


def _run(model: nn.Module, x):
    p = next(model.parameters(), None)
    t = torch.from_numpy(x).to(p.device if p is not None else "cpu")
    with torch.inference_mode():
        return model(t).float().cpu().numpy()

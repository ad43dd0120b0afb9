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
from resforge.weights import WeightsError, guess_architecture, load_weights, read_state_dict

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
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


VERSION_REF = re.compile(r"(.+)@(v[1-9][0-9]{0,5}|latest)")       # RUN@v3, RUN@latest


def version_folder(source: str | Path) -> Path | None:
    """RUN@vN -> RUN/versions/vN, RUN@latest -> the run's newest version (continual/versions.py
    lays them out); None when `source` is not of that form (or is an existing path)."""
    m = VERSION_REF.fullmatch(str(source))
    if m is None or Path(source).exists():
        return None
    run, tag = Path(m.group(1)), m.group(2)
    if tag == "latest":
        root = run / "versions"
        numbers = sorted(int(p.name[1:]) for p in root.iterdir()
                         if re.fullmatch(r"v[1-9][0-9]{0,5}", p.name) and p.is_dir()) if root.is_dir() else []
        if not numbers:
            raise FileNotFoundError(f"{run} has no model versions ({source}): make one with `resforge update "
                                    f"{run} --data NEW`, or pass the run folder itself")
        return root / f"v{numbers[-1]}"
    folder = run / "versions" / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{run} has no model version {tag} ({source}); list them with "
                                f"`resforge versions {run}`")
    return folder


def resolve_weights(source: str | Path, which: str = "best") -> Path:
    """A run folder, a model version (RUN/versions/vN, RUN@vN, RUN@latest), a weights folder or a
    file -> the weights file to read."""
    p = version_folder(source) or Path(source)
    if p.is_dir():
        for cand in (p / "weights" / f"{which}.safetensors", p / f"{which}.safetensors",
                     p / "weights" / "last.safetensors", p / "last.safetensors"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p} is a folder without weights/{which}.safetensors: "
                                "pass a run folder of resforge or a weights file")
    if not p.is_file():
        raise FileNotFoundError(f"weights not found: {p}")
    return p


def read_meta(path: Path) -> dict:
    """The sidecar of a resforge checkpoint, verified against its weights file and validated
    (artifact.read_sidecar); {} when the weights have none."""
    return artifact.read_sidecar(Path(path)) or {}


def default_meta_for(model: nn.Module, fmt: str, class_names: list[str] | None, in_chans: int) -> dict:
    """Preprocessing for third-party weights: both torchvision/timm and the akamaster CIFAR
    nets were trained on ImageNet-normalised inputs. The meta says it was assumed."""
    cfg = model.default_cfg
    k = model.fc.out_features if hasattr(model, "fc") else None
    mean = IMAGENET_MEAN if in_chans == 3 else [sum(IMAGENET_MEAN) / 3] * in_chans
    std = IMAGENET_STD if in_chans == 3 else [sum(IMAGENET_STD) / 3] * in_chans
    return {"model": {"name": cfg["arch"], "num_classes": k, "in_chans": in_chans, "kwargs": {}},
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
    ResNets, the akamaster CIFAR ResNets) need `model_name` unless their keys identify it.
    Either way the result is proven to fit its meta (artifact.check_outputs) before it is
    returned: a bad artifact fails here, not on the first image."""
    path = resolve_weights(source)
    sd, meta, fmt = read_state_dict(path)          # a resforge sidecar comes back validated
    if fmt == "resforge":
        m = meta["model"]
        if model_name and model_name != m["name"]:
            raise WeightsError(f"{path} holds a {m['name']}, not a {model_name}: drop --model "
                               f"or pass weights of a {model_name}")
        model = _build(path, m["name"], m["num_classes"], m["in_chans"], m.get("kwargs", {}), sd, "checkpoint")
    else:
        name = model_name or guess_architecture(sd)
        if name is None:
            raise WeightsError(f"cannot tell which architecture {path} holds: pass --model NAME "
                               "(see `resforge models`)")
        file_classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else None
        k = num_classes or file_classes
        c = in_chans or (sd["conv1.weight"].shape[1] if "conv1.weight" in sd else 3)
        if class_names is not None and len(class_names) != k:
            raise WeightsError(f"{path} has {k} outputs but {len(class_names)} class names were given")
        most = artifact.limit("max_classes")
        if k is not None and not 1 <= k <= most or not 1 <= c <= artifact.MAX_IN_CHANS:
            raise ArtifactError(f"{path}: {k} classes and {c} input channels are outside 1..{most} and "
                                f"1..{artifact.MAX_IN_CHANS}; {artifact.REMEDY['weights']}")
        model = _build(path, name, k, c, {}, sd, "weights")
        meta = artifact.validate_meta({**default_meta_for(model, fmt, class_names, c), "weights": str(path)},
                                      path, "weights")
        log.warning("%s has no resforge sidecar: assuming ImageNet preprocessing (mean %s, std %s, "
                    "%dx%d); predictions are only right if the model was trained so", path,
                    _short(meta["mean"]), _short(meta["std"]), *meta["input_size"][1:])
    model = model.to(device).eval()
    artifact.check_outputs(lambda x: _run(model, x), meta, path, "checkpoint" if fmt == "resforge" else "weights")
    return model, meta


def _short(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _build(path: Path, name: str, k: int, c: int, kwargs: dict, sd: dict, kind: str) -> nn.Module:
    """The registry model loaded with `sd`; a builder's complaint about the recorded settings
    becomes an ArtifactError about the file."""
    from resforge.models import create_model
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

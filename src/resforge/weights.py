"""Reading weight files safely and loading them into resforge models with clear errors.

No pickle code is ever executed: `.safetensors` files are read with safetensors, everything
else with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.

Formats recognised (`fmt`):
  "resforge"    resforge checkpoint (safetensors + `<stem>.json` sidecar, "format": "resforge-checkpoint")
  "torchvision" torchvision / timm ImageNet ResNet keys (conv1, bn1, layer1..4, fc)
  "akamaster"   akamaster/pytorch_resnet_cifar10 CIFAR ResNets (`linear.*` head, renamed to `fc.*`)
  "state_dict"  anything else that is a flat {name: tensor} mapping
"""
from __future__ import annotations

import math
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # checked in this order
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
HEAD_KEYS = ("fc.weight", "fc.bias")
STEM_KEY = "conv1.weight"
_IMAGENET_LAYOUTS = {  # blocks per stage -> name (BasicBlock, Bottleneck)
    (2, 2, 2, 2): ("resnet18", None), (3, 4, 6, 3): ("resnet34", "resnet50"),
    (3, 4, 23, 3): (None, "resnet101"), (3, 8, 36, 3): (None, "resnet152"),
}


class WeightsError(ValueError):
    """A weights file could not be read or does not fit the model."""


class UnsafeWeightsError(WeightsError):
    """The file is a pickle that holds Python objects beyond tensors; it was not executed."""


class HeadMismatchError(WeightsError):
    """Only the classifier (fc) differs between the file and the model."""


class ArchitectureMismatchError(WeightsError):
    """Keys or shapes beyond the head/stem differ: the file is for another architecture."""


@dataclass
class LoadResult:
    fmt: str
    meta: dict[str, Any]
    loaded: list[str] = field(default_factory=list)      # model keys filled from the file
    missing: list[str] = field(default_factory=list)     # model keys left as they were
    unexpected: list[str] = field(default_factory=list)  # file keys not used
    adapted: list[str] = field(default_factory=list)     # keys changed to fit (in_chans)


# ----------------------------------------------------------------------------- reading

def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read a weights file -> (state_dict with resforge key names, meta, fmt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    from resforge.artifact import check_weights, nonfinite_tensor, read_sidecar

    sidecar = None
    if _is_safetensors(path):
        blob = path.read_bytes()
        obj = _read_safetensors(path, blob)
        sidecar = read_sidecar(path, blob, required=_written_by_resforge(blob))   # None: not ours
    else:
        obj = read_torch_file(path)
    state_dict, extra = _unwrap(obj, path)
    state_dict, fmt = normalize_state_dict(state_dict)
    bad = nonfinite_tensor(state_dict)
    if bad is not None:
        raise WeightsError(f"{path}: tensor {bad} holds NaN or inf, so every prediction would be "
                           "NaN; use an earlier checkpoint of the run (training diverged or the file "
                           "was damaged)")
    if sidecar is not None:
        check_weights(state_dict, sidecar, path)
        return state_dict, sidecar, "resforge"
    return state_dict, extra, fmt


def _is_safetensors(path: Path) -> bool:
    # by name, or by content: an 8-byte little-endian header length, then the JSON header
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _written_by_resforge(blob: bytes) -> bool:
    """Whether the safetensors header carries the metadata checkpoint.save_checkpoint writes."""
    import json
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + min(n, 100_000_000)])
        return header.get("__metadata__", {}).get("resforge") == "resforge-checkpoint"
    except (ValueError, AttributeError, RecursionError):
        return False


def _read_safetensors(path: Path, blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        return load(blob)
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None


_CONVERT = ("If you trust the file, convert it to .safetensors in a separate environment "
            "(torch.load(..., weights_only=False), then safetensors.torch.save_file(state_dict, "
            "'weights.safetensors')) and load that instead.")


def read_torch_file(path: Path, *, what: str = "PyTorch weights file", fix: str = _CONVERT) -> Any:
    """torch.load(weights_only=True) with one clear WeightsError instead of torch's traceback
    (which advises weights_only=False: exactly what must not be done with a stranger's file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        imports = _pickle_imports(path)
        if not imports:  # torch could not even parse it as a pickle
            raise WeightsError(f"{path}: not a readable {what} ({str(e).strip()[:200]})") from None
        shown = [n for n in imports if not n.startswith(("torch.", "collections."))] or imports
        shown = list(dict.fromkeys(shown))[:3]
        raise UnsafeWeightsError(
            f"refusing to load {path}: it is a pickle that contains Python objects beyond tensors "
            f"(it would import {', '.join(shown)}). Loading it could run arbitrary code, so it "
            f"will not be executed. {fix}") from None
    except Exception as e:  # zip framing errors, truncated files, ...
        raise WeightsError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None


def _pickle_imports(path: Path) -> list[str]:
    """The module.name globals a pickle (or torch zip's data.pkl) refers to, found by
    disassembly: pickletools only decodes opcodes, it never imports or calls anything."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            inner = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            data = z.read(inner) if inner else b""
    names: list[str] = []
    strings: list[str] = []  # STACK_GLOBAL takes module and name from the two last pushed strings
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle, or trailing bytes: judge by what was decoded
        pass
    return names


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, source: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict inside common containers; scalars beside it become meta.

    {'best_prec1': 91.7, 'state_dict': {...}} -> ({...}, {'best_prec1': 91.7})
    """
    meta: dict[str, Any] = {}
    while not _is_tensor_dict(obj):
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{source}: expected a state dict, found {type(obj).__name__}")
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise WeightsError(f"{source}: no state dict found (top-level keys: {list(obj)[:10]}; "
                               f"looked for a tensor mapping or one of {CONTAINER_KEYS})")
        meta.update({k: v for k, v in obj.items()
                     if k != inner and isinstance(v, (int, float, str, bool))})
        obj = obj[inner]
    return dict(obj), meta


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], str]:
    """Strip wrapper prefixes, rename akamaster's head, detect the format."""
    sd = {_strip(k): v for k, v in state_dict.items()}
    fmt = "state_dict"
    if "linear.weight" in sd and any(k.startswith("layer3.") for k in sd) \
            and not any(k.startswith("layer4.") for k in sd):
        sd = {(f"fc.{k[7:]}" if k.startswith("linear.") else k): v for k, v in sd.items()}
        fmt = "akamaster"
    elif "fc.weight" in sd and STEM_KEY in sd and any(k.startswith("layer4.") for k in sd):
        fmt = "torchvision"
    return sd, fmt


# ----------------------------------------------------------------------------- recognising

def _blocks_per_stage(keys: list[str]) -> tuple[int, ...]:
    counts: dict[int, int] = {}
    for k in keys:
        m = re.match(r"layer(\d+)\.(\d+)\.", k)
        if m:
            stage, block = int(m[1]), int(m[2])
            counts[stage] = max(counts.get(stage, 0), block + 1)
    return tuple(counts[s] for s in sorted(counts))


def guess_architecture(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the registered architecture whose keys these look like, e.g. "resnet56"; else None.

    Option-A CIFAR ResNets and their plainN twins have identical keys: both read as "resnetN".
    """
    sd, _ = normalize_state_dict(state_dict)
    blocks = _blocks_per_stage(list(sd))
    if len(blocks) == 4:
        basic, bottleneck = _IMAGENET_LAYOUTS.get(blocks, (None, None))
        return bottleneck if any(k.endswith("conv3.weight") for k in sd) else basic
    if len(blocks) == 3 and len(set(blocks)) == 1:
        return f"resnet{6 * blocks[0] + 2}"  # He et al. CIFAR layout: depth 6n + 2
    return None


# ----------------------------------------------------------------------------- loading

def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Fit a stem filter bank (O, C, kh, kw) to `in_chans` inputs, keeping response magnitudes.

    1 channel: sum over C (a grey image x gives the response the RGB net gives to (x, x, x)).
    Otherwise: tile the C filters cyclically to in_chans and scale by C / in_chans, so an
    input constant across channels still gives the same response.
    """
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def load_weights(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, torch.Tensor], *,
                 strict: bool = True, adapt_in_chans: bool = True, head: str = "strict",
                 source: str | None = None) -> LoadResult:
    """Load weights into `model`, adapting the stem and head as asked.

    source: what to call a given state dict in error messages (e.g. the file it was read from).

    head: "strict" -- the fc must match (else HeadMismatchError saying how to fine-tune);
          "reset" -- ignore the file's fc, the model keeps its fresh one;
          "keep-matching" -- load the fc if its shape matches, else keep the fresh one.
    strict: architecture mismatches (missing/unexpected keys, shapes beyond head/stem) raise
        ArchitectureMismatchError; with strict=False the matching part is loaded and the rest
        reported in the returned LoadResult.
    """
    if head not in ("strict", "reset", "keep-matching"):
        raise ValueError(f"head must be 'strict', 'reset' or 'keep-matching', got {head!r}")
    if isinstance(path_or_state_dict, Mapping):
        source = source or "the given state dict"
        sd, meta = _unwrap(path_or_state_dict, source)
        sd, fmt = normalize_state_dict(sd)
    else:
        source = str(path_or_state_dict)
        sd, meta, fmt = read_state_dict(path_or_state_dict)
    target = model.state_dict()
    result = LoadResult(fmt=fmt, meta=meta)
    arch = getattr(model, "default_cfg", {}).get("arch", type(model).__name__)

    sd = dict(sd)
    head_error = _fit_head(sd, target, head, source, arch, result)
    _fit_stem(sd, target, adapt_in_chans, source, result)

    # BN buffers that old checkpoints lack (num_batches_tracked) are no architecture mismatch;
    # nor is a file without fc unless the head is to be loaded strictly.
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")
               and not (head != "strict" and k in HEAD_KEYS)]
    unexpected = [k for k in sd if k not in target]
    wrong_shape = [k for k in sd if k in target and sd[k].shape != target[k].shape
                   and not (head_error and k in HEAD_KEYS)]
    if strict and (missing or unexpected or wrong_shape):
        raise ArchitectureMismatchError(_arch_message(source, arch, sd, target,
                                                      missing, unexpected, wrong_shape))
    if head_error:  # raised only now, so "everything else matches" is true
        raise HeadMismatchError(head_error)
    usable = {k: v for k, v in sd.items() if k in target and k not in wrong_shape}
    model.load_state_dict(usable, strict=False)
    result.loaded = sorted(usable)
    result.missing = [k for k in target if k not in usable and not k.endswith("num_batches_tracked")]
    result.unexpected = sorted(set(sd) - set(usable)) + result.unexpected
    return result


def _fit_head(sd: dict, target: dict, head: str, source: str, arch: str,
              result: LoadResult) -> str | None:
    """Apply the head policy in place (drop the file's fc keys when they are not to be loaded);
    return the error message when head="strict" and only the number of classes differs."""
    file_w, model_w = sd.get("fc.weight"), target.get("fc.weight")
    if file_w is None:
        return None
    same = model_w is not None and file_w.shape == model_w.shape and \
        all(sd[k].shape == target[k].shape for k in HEAD_KEYS if k in sd and k in target)
    if head == "reset" or (head == "keep-matching" and not same):
        result.unexpected += [k for k in HEAD_KEYS if k in sd]
        for k in HEAD_KEYS:
            sd.pop(k, None)
        return None
    if same or model_w is None or file_w.dim() != 2 or file_w.shape[1] != model_w.shape[1]:
        return None  # matches, or a feature-width difference: that is an architecture mismatch
    n_file, n_model = file_w.shape[0], model_w.shape[0]
    return (f"classifier head mismatch loading {source} into {arch}: the file has {n_file} classes "
            f"(fc.weight {list(file_w.shape)}), the model has {n_model} classes "
            f"(fc.weight {list(model_w.shape)}). Everything else matches. To fine-tune these weights "
            f"on {n_model} classes, build the model with create_model('{arch}', num_classes={n_model}, "
            f"pretrained=..., head='reset') (or call load_weights(model, ..., head='reset')), or run "
            f"`resforge finetune`, which starts from a fresh {n_model}-class head.")


def _fit_stem(sd: dict, target: dict, adapt: bool, source: str, result: LoadResult) -> None:
    """Adapt conv1's input channels (e.g. RGB weights for a grey model) in place."""
    w, t = sd.get(STEM_KEY), target.get(STEM_KEY)
    if w is None or t is None or w.shape == t.shape or w.dim() != 4:
        return
    only_cin_differs = w.shape[0] == t.shape[0] and w.shape[2:] == t.shape[2:]
    if not only_cin_differs:
        return  # different stem (e.g. 7x7 vs 3x3): reported as an architecture mismatch
    if not adapt:
        raise WeightsError(
            f"{source}: conv1 takes {w.shape[1]} input channels, the model {t.shape[1]}; "
            f"pass adapt_in_chans=True to adapt the filters")
    sd[STEM_KEY] = adapt_input_channels(w, t.shape[1]).to(w.dtype)
    result.adapted.append(STEM_KEY)


def _arch_message(source: str, arch: str, sd: dict, target: dict, missing: list[str],
                  unexpected: list[str], wrong_shape: list[str]) -> str:
    def listing(title: str, keys: list[str], show) -> str:
        if not keys:
            return ""
        more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
        return f"\n  {title} ({len(keys)}): " + ", ".join(show(k) for k in keys[:5]) + more

    guess = guess_architecture(sd)
    looks = (f" The file looks like {guess}." if guess and guess != arch
             else "" if guess else " Its architecture is not one resforge recognises.")
    file_proj, model_proj = (any(".downsample." in k for k in d) for d in (sd, target))
    if guess == arch and file_proj != model_proj:  # same depth, other CIFAR shortcut option
        looks += (f" The file has {'projection' if file_proj else 'parameter-free'} shortcuts: "
                  f"create the model with shortcut={'B' if file_proj else 'A'!r}.")
    return (f"{source} does not fit {arch}.{looks}"
            + listing("missing from the file", missing, str)
            + listing("unexpected in the file", unexpected, str)
            + listing("shape mismatches", wrong_shape,
                      lambda k: f"{k} file {list(sd[k].shape)} vs model {list(target[k].shape)}")
            + (f"\n  Build the matching model, e.g. create_model('{guess}', ...)."
               if guess and guess != arch else ""))

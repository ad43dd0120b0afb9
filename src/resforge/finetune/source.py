"""Pretrained starting points for fine-tuning: the weights file (identified by
weightfile.read_weights_file), loaded into a model for the new data (new head, adapted stem),
and keeping head rows of shared classes.

Three kinds of files load here: resforge checkpoints (architecture, classes and normalisation
come from their sidecar), torchvision/timm-format ImageNet ResNets and the akamaster CIFAR-10
ResNets (architecture read from the keys; ImageNet normalisation, as both were trained with it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from resforge.models import create_model
from resforge.weightfile import read_weights_file
from resforge.weights import load_weights

SCRATCH = "scratch:"


@dataclass
class Pretrained:
    """What is known about the weights a fine-tuning run starts from."""
    path: Path
    fmt: str                              # resforge | torchvision | akamaster | state_dict | scratch
    arch: str
    kwargs: dict                          # builder kwargs (small_input, shortcut, ...)
    in_chans: int                         # input channels of the file's stem
    class_names: list[str] | None         # the file's classes, when known
    mean: list[float]
    std: list[float]
    input_size: list[int]                 # (C, H, W) the weights were trained at
    state_dict: dict = field(repr=False, default_factory=dict)


def read_pretrained(source: str | Path, model_name: str | None = None,
                    source_classes: str | None = None) -> Pretrained:
    """Identify the weights behind `source` (run folder or file; weightfile.read_weights_file);
    `model_name` must agree. "scratch:ARCH" is a randomly initialised ARCH: the from-scratch
    control of a comparison, run through exactly the same pipeline (input size, augmentation,
    splits, loop)."""
    if str(source).startswith(SCRATCH):
        return _scratch(str(source)[len(SCRATCH):], model_name)
    wf = read_weights_file(source, model_name)
    arch = wf.require_arch()
    # The fine-tuning policy sets its own dropout: a checkpoint's drop_rate is not carried over.
    kwargs = {k: v for k, v in wf.kwargs.items() if k != "drop_rate"}
    names = wf.class_names
    if source_classes and wf.fmt != "resforge":
        names = read_class_names(source_classes)
    return Pretrained(wf.path, wf.fmt, arch, kwargs, wf.in_chans, names, wf.mean, wf.std, wf.input_size,
                      wf.state_dict)


def _scratch(arch: str, model_name: str | None) -> Pretrained:
    if model_name and model_name != arch:
        raise ValueError(f"--from scratch:{arch} and --model {model_name} disagree: name one architecture")
    with torch.device("meta"):
        default = create_model(arch).default_cfg       # unknown names fail here, with suggestions
    c = default["input_size"][0]
    return Pretrained(Path(SCRATCH + arch), "scratch", arch, {}, c, None, [], [], list(default["input_size"]), {})


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines and '#' comments skipped), in output order."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"finetune.source_classes={path}: no such file; it should list the "
                                "pretrained classes' names, one per line, in the order of the head's outputs")
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def input_stats(pre: Pretrained, in_chans: int) -> tuple[list[float], list[float]]:
    """The normalisation the weights expect, for data with `in_chans` channels (a grey image
    fed to an adapted RGB stem is normalised with the channel average)."""
    if in_chans == len(pre.mean):
        return pre.mean, pre.std
    return [sum(pre.mean) / len(pre.mean)] * in_chans, [sum(pre.std) / len(pre.std)] * in_chans


def build_from_pretrained(pre: Pretrained, num_classes: int, in_chans: int,
                          drop_rate: float = 0.0) -> tuple[nn.Module, dict]:
    """The file's network with a fresh `num_classes` head (stem adapted to `in_chans`);
    -> (model, builder kwargs). Architecture mismatches raise ArchitectureMismatchError."""
    kwargs = dict(pre.kwargs, **({"drop_rate": drop_rate} if drop_rate else {}))
    model = create_model(pre.arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pre.fmt != "scratch":
        load_weights(model, pre.state_dict, head="reset")
    return model, kwargs


# ---------------------------------------------------------------- keeping head rows

def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def class_row_map(new: list[str], old: list[str] | None, class_map: str | None) -> dict[int, int]:
    """{new class index: pretrained class index} from an explicit map or matching names."""
    if class_map:
        return _explicit_map(new, old, _parse_class_map(class_map))
    if old is None:
        raise ValueError("finetune.keep_class_rows needs the pretrained class names, which this weights "
                         "file does not carry: pass finetune.source_classes=FILE (one name per line) "
                         "or finetune.class_map=new:old,...")
    where = {_norm(n): j for j, n in enumerate(old)}
    rows = {i: where[_norm(n)] for i, n in enumerate(new) if _norm(n) in where}
    if not rows:
        raise ValueError(f"finetune.keep_class_rows: none of the data's classes ({_few(new)}) matches a "
                         f"pretrained class ({_few(old)}): map them with finetune.class_map=new:old,... "
                         "or set finetune.keep_class_rows=false")
    return rows


def _parse_class_map(spec: str) -> dict[str, str]:
    p = Path(spec)
    if p.suffix.lower() in (".json", ".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"finetune.class_map={spec}: no such file")
        data = json.loads(p.read_text()) if p.suffix.lower() == ".json" else yaml.safe_load(p.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"finetune.class_map={spec}: expected a mapping new class -> pretrained class")
        return {str(k): str(v) for k, v in data.items()}
    pairs = [item.split(":", 1) for item in spec.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"finetune.class_map={spec!r}: write it as new:old pairs, e.g. "
                         "'cat:cat,car:automobile', or give a .json/.yaml file")
    return {a.strip(): b.strip() for a, b in pairs}


def _explicit_map(new: list[str], old: list[str] | None, pairs: dict[str, str]) -> dict[int, int]:
    new_at = {n: i for i, n in enumerate(new)}
    old_at = {n: j for j, n in enumerate(old or [])}
    rows = {}
    for a, b in pairs.items():
        if a not in new_at:
            raise ValueError(f"finetune.class_map: {a!r} is not a class of the data (classes: {_few(new)})")
        if b in old_at:
            rows[new_at[a]] = old_at[b]
        elif b.isdigit():
            rows[new_at[a]] = int(b)
        else:
            known = f"pretrained classes: {_few(old)}" if old else "the file has no class names; use indices"
            raise ValueError(f"finetune.class_map: {b!r} is not a pretrained class ({known})")
    return rows


def _few(names, k: int = 6) -> str:
    names = list(names or [])
    return ", ".join(map(str, names[:k])) + (f", ... ({len(names)} in all)" if len(names) > k else "")


@torch.no_grad()
def keep_class_rows(model: nn.Module, pre: Pretrained, rows: dict[int, int]) -> int:
    """Copy the pretrained fc rows into the new head; -> number of rows kept."""
    w, b = pre.state_dict.get("fc.weight"), pre.state_dict.get("fc.bias")
    if w is None:
        raise ValueError(f"{pre.path} has no classifier (fc) to keep rows from: "
                         "set finetune.keep_class_rows=false")
    bad = [j for j in rows.values() if j >= w.shape[0]]
    if bad:
        raise ValueError(f"finetune.class_map: pretrained class index {bad[0]} is out of range "
                         f"(the file's head has {w.shape[0]} classes)")
    for i, j in rows.items():
        model.fc.weight[i].copy_(w[j])
        if b is not None and model.fc.bias is not None:
            model.fc.bias[i].copy_(b[j])
    return len(rows)

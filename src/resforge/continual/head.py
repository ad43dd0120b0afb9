"""New data's classes against the model's, by name; and growing the classifier for new ones.

Matching is by exact name. Names that differ only in case, spacing, '_' or '-' ("Cat" vs "cat ",
"sea_lion" vs "sea lion") are ambiguous: the same class spelt twice, or two classes? That needs
the user's word:
    --merge NEW=OLD    the data's class NEW is the model's class OLD (its images train row OLD)
    --rename OLD=NEW   the model's class OLD is called NEW from this version on (same row)
Everything else in the data is a new class and gets a new row at the end of the head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


class ClassClashError(ValueError):
    """Class names of the new data and the model that cannot be matched without the user's word."""


@dataclass
class Reconciled:
    class_names: list[str]           # the head after the update: old rows (renamed) then the new classes
    head_index: list[int]            # data label i -> head row
    added: list[str]                 # the new classes, in head order
    renamed: dict[str, str]          # model class -> its new name
    merged: dict[str, str]           # data class -> the model class it joins


def norm_name(name: str) -> str:
    """The spelling-insensitive key: case-folded, '_'/'-'/whitespace runs as one space, stripped."""
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


def parse_pairs(items, flag: str) -> dict[str, str]:
    """['a=b', ...] (or one 'a=b,c=d' string) -> {'a': 'b', ...}; malformed -> one sentence."""
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for item in items or []:
        for part in str(item).split(","):
            if not part.strip():
                continue
            a, eq, b = part.partition("=")
            if not eq or not a.strip() or not b.strip():
                raise ClassClashError(f"{flag} {part!r} is not of the form NAME=NAME (e.g. {flag} cat=Cat)")
            if a.strip() in out:
                raise ClassClashError(f"{flag} names {a.strip()!r} twice")
            out[a.strip()] = b.strip()
    return out


def reconcile(old: list[str], new: list[str], rename: dict[str, str] | None = None,
              merge: dict[str, str] | None = None) -> Reconciled:
    """Match the data's classes `new` (label order) to the model's `old` (head order)."""
    rename, merge = dict(rename or {}), dict(merge or {})
    for o in rename:
        if o not in old:
            raise ClassClashError(f"--rename {o}={rename[o]}: the model has no class {o!r} (its classes: "
                                  f"{_show(old)})")
    names = [rename.get(o, o) for o in old]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ClassClashError(f"--rename would give two of the model's classes the name {dup!r}")
    for n, o in merge.items():
        if n not in new:
            raise ClassClashError(f"--merge {n}={o}: the new data has no class {n!r} (its classes: {_show(new)})")
        if o not in names:
            raise ClassClashError(f"--merge {n}={o}: the model has no class {o!r} (its classes: {_show(names)})")
    keys = {}
    for n in new:
        keys.setdefault(norm_name(n), []).append(n)
    twins = next((v for v in keys.values() if len(v) > 1), None)
    if twins:
        raise ClassClashError(f"the new data has classes {twins[0]!r} and {twins[1]!r}, which differ only in case or "
                              "spacing: rename one of its folders (or fix its class names) so they differ clearly, "
                              "or make them one class")
    row = {n: i for i, n in enumerate(names)}
    by_key = {norm_name(n): n for n in names}
    head_index, added = [], []
    for n in new:
        if n in merge:
            head_index.append(row[merge[n]])
        elif n in row:
            head_index.append(row[n])
        elif norm_name(n) in by_key:
            o = by_key[norm_name(n)]
            raise ClassClashError(f"the new data's class {n!r} and the model's class {o!r} differ only in case or "
                                  f"spacing: if they are the same class pass --merge '{n}={o}' (or --rename "
                                  f"'{o}={n}' to adopt the new spelling); if they are different classes pass "
                                  f"--rename '{o}=<another name>' so the names differ clearly")
        else:
            head_index.append(len(names) + len(added))
            added.append(n)
    return Reconciled(names + added, head_index, added, {o: n for o, n in rename.items() if o != n}, merge)


def _show(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


@torch.no_grad()
def grow_head(model: nn.Module, n_new: int, seed: int = 0) -> nn.Module:
    """Give model.fc n_new more output rows, in place. Old rows (and biases) are copied bit for
    bit, so the old classes' logits are unchanged until training moves them; new rows point in
    random directions with the mean L2 norm of the old rows, new biases are the old biases' mean
    (a new class starts neither favoured nor suppressed)."""
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear classifier (model.fc) to grow")
    if n_new <= 0:
        return model
    k, d = fc.weight.shape
    new = nn.Linear(d, k + n_new, bias=fc.bias is not None, device=fc.weight.device, dtype=fc.weight.dtype)
    new.weight[:k] = fc.weight
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_new, d, generator=g).to(fc.weight)
    norm = fc.weight.norm(dim=1).mean()
    new.weight[k:] = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
    if fc.bias is not None:
        new.bias[:k] = fc.bias
        new.bias[k:] = fc.bias.mean()
    model.fc = new
    model.num_classes = k + n_new
    if isinstance(getattr(model, "default_cfg", None), dict):
        model.default_cfg["num_classes"] = k + n_new
    return model


@torch.no_grad()
def align_weights(model: nn.Module, n_old: int) -> float | None:
    """Weight aligning (Zhao et al. 2020): scale the new classes' weight rows so their mean L2 norm
    equals the old classes' (the new rows grow larger in class-incremental training, which biases
    predictions toward new classes). Biases are left as they are. -> the factor (None: no new rows)."""
    w = model.fc.weight
    if n_old <= 0 or n_old >= w.shape[0]:
        return None
    gamma = (w[:n_old].norm(dim=1).mean() / w[n_old:].norm(dim=1).mean().clamp_min(1e-12)).item()
    w[n_old:] *= gamma
    return gamma

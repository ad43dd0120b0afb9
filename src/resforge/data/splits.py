"""Train / val / test splits: stratified carving, and a manifest that pins them down.

A manifest lists the item ids of every split; applying it to the same source reproduces the
splits exactly (same items, same order), whatever seed or fraction is passed later. Its "hash"
(sha256 of the canonical JSON of "splits") is what checkpoints record as split_hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from resforge.atomic import atomic_write_text

SPLIT_NAMES = ("train", "val", "test")


def make_splits(bundle, val_fraction: float = 0.1, seed: int = 0, manifest: dict | None = None):
    """-> (bundle with train/val/test, manifest dict).

    Missing "test" and "val" are each carved, stratified, from train with
    round(val_fraction * len(original train)) items; existing splits are kept as they are.
    val_fraction=0 leaves "val" empty (train on everything; "test" must then exist).
    With a manifest, its splits are applied instead (seed and val_fraction are ignored) and the
    returned manifest keeps its extra keys.
    """
    if manifest is not None:  # keys this module does not know (e.g. train_fraction) are kept
        out = apply_manifest(bundle, manifest)
        return out, {**manifest, **build_manifest(out, manifest.get("seed"), manifest.get("val_fraction"))}
    if "train" not in bundle.splits:
        raise ValueError(f"{bundle.name}: no 'train' split to carve val/test from")
    splits = dict(bundle.splits)
    n = round(val_fraction * len(splits["train"].labels))
    for name in ("test", "val"):
        if name == "val" and name not in splits and val_fraction == 0:   # no validation: empty split
            splits["val"] = take(splits["train"], [])
            continue
        if name not in splits:
            _check_carve(bundle.name, name, n, val_fraction, len(splits["train"].labels))
            splits["train"], splits[name] = _carve(splits["train"], n, seed, name)
    out = dataclasses.replace(bundle, splits={s: splits[s] for s in SPLIT_NAMES})
    return out, build_manifest(out, seed, val_fraction)


def _check_carve(source: str, name: str, n: int, val_fraction: float, n_train: int) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"{source}: val_fraction must be in (0, 1) to carve '{name}', got {val_fraction}")
    if n < 1 or n >= n_train:
        raise ValueError(f"{source}: val_fraction={val_fraction} of {n_train} train items gives "
                         f"{n} items for '{name}'; need at least 1 and fewer than the train split")


def _carve(split, n: int, seed: int, name: str):
    """(rest, carved): a stratified random n-item split taken out of `split`."""
    rest, taken = _stratified_pick(split.labels, n, seed, f"carving '{name}'")
    return take(split, rest), take(split, taken)


def _stratified_pick(labels: np.ndarray, n: int, seed: int, what: str):
    """Sorted (rest, picked) index arrays; picked has n items, stratified when possible."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if n >= len(labels):
        return idx[:0], idx
    try:
        rest, picked = train_test_split(idx, test_size=n, stratify=labels, random_state=seed)
    except ValueError as e:  # a class with < 2 members, or n smaller than the number of classes
        smallest = min(Counter(labels.tolist()).values())
        warnings.warn(f"{what}: stratified split impossible ({e}; smallest class has {smallest} "
                      "items); falling back to a plain random split")
        rest, picked = train_test_split(idx, test_size=n, random_state=seed)
    return np.sort(rest), np.sort(picked)


def take(split, idx):
    """Split restricted to the given indices (in that order); images are copied out of memmaps."""
    idx = np.asarray(idx, dtype=np.int64)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return type(split)(labels=split.labels[idx],
                       images=None if split.images is None else np.asarray(split.images[idx]),
                       files=pick(split.files), ids=pick(split.ids))


# ---------------------------------------------------------------- manifest

def manifest_hash(splits: dict) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(bundle, seed, val_fraction) -> dict:
    splits = {s: list(sp.ids) for s, sp in bundle.splits.items()}
    return {"source": bundle.name, "fingerprint": bundle.fingerprint, "seed": seed,
            "val_fraction": val_fraction, "splits": splits, "hash": manifest_hash(splits)}


def apply_manifest(bundle, manifest: dict):
    """Bundle whose splits are exactly the manifest's (ids looked up across all source splits)."""
    where = _id_index(bundle)
    wanted = [i for ids in manifest["splits"].values() for i in ids]
    missing = [i for i in wanted if i not in where]
    if missing:
        raise ValueError(f"{len(missing)} ids in the split manifest are missing from source "
                         f"'{bundle.name}' (e.g. {missing[0]!r}); the data changed since the manifest "
                         "was written: restore the data or make a new manifest")
    dup = [i for i, k in Counter(wanted).items() if k > 1]
    if dup:
        raise ValueError(f"split manifest lists {len(dup)} ids more than once (e.g. {dup[0]!r}); "
                         "it is corrupt: make a new one")
    if manifest.get("fingerprint") not in (None, bundle.fingerprint):
        warnings.warn(f"split manifest was made from a different version of '{bundle.name}' "
                      "(fingerprint differs; every id is still present, so it is applied)")
    if len(wanted) < len(where):
        warnings.warn(f"{len(where) - len(wanted)} items of '{bundle.name}' are not in the split "
                      "manifest and are left out")
    splits = {s: _gather(bundle, [where[i] for i in ids]) for s, ids in manifest["splits"].items()}
    return dataclasses.replace(bundle, splits=splits)


def _id_index(bundle) -> dict:
    where = {}
    for s, sp in bundle.splits.items():
        for i, item in enumerate(sp.ids):
            if item in where:
                raise ValueError(f"{bundle.name}: item id {item!r} occurs twice; ids must be unique")
            where[item] = (s, i)
    return where


def _gather(bundle, refs: list[tuple[str, int]]):
    """Split made of (source split, index) refs, in ref order."""
    sources = list(dict.fromkeys(s for s, _ in refs))
    if not sources:                                    # an empty split (val_fraction=0)
        return take(next(iter(bundle.splits.values())), [])
    if len(sources) == 1:
        return take(bundle.splits[sources[0]], [i for _, i in refs])
    parts = [take(bundle.splits[s], [i for ss, i in refs if ss == s]) for s in sources]
    joined = _concat(parts)
    order = {ref: k for k, ref in enumerate(r for s in sources for r in refs if r[0] == s)}
    return take(joined, [order[r] for r in refs])


def _concat(parts):
    first = parts[0]
    cat = lambda xs: None if xs[0] is None else [x for p in xs for x in p]  # noqa: E731
    return type(first)(labels=np.concatenate([p.labels for p in parts]),
                       images=None if first.images is None else np.concatenate([p.images for p in parts]),
                       files=cat([p.files for p in parts]), ids=cat([p.ids for p in parts]))


def save_manifest(path, manifest: dict) -> None:
    """Write atomically; the hash is recomputed so an edited manifest stays consistent."""
    m = {**manifest, "hash": manifest_hash(manifest["splits"])}
    atomic_write_text(Path(path), json.dumps(m, indent=1))


def load_manifest(path) -> dict:
    """Read and validate a manifest (types, hash): resforge.artifact.read_manifest."""
    from resforge.artifact import read_manifest
    return read_manifest(path)


# ---------------------------------------------------------------- subsets

def subset(bundle, split: str, fraction_or_count, seed: int = 0, *, per_class: bool = False):
    """Bundle whose `split` keeps a stratified random subset (order preserved).

    fraction_or_count: float in (0, 1] = fraction, int >= 1 = item count
    (per_class=True: that many items of each class, or all of a smaller class).
    """
    sp = bundle.splits[split]
    n_total = len(sp.labels)
    if per_class:
        idx = _per_class_pick(sp.labels, _count(fraction_or_count, None), seed)
    else:
        n = _count(fraction_or_count, n_total)
        idx = _stratified_pick(sp.labels, n, seed, f"subset of '{split}'")[1]
    return dataclasses.replace(bundle, splits={**bundle.splits, split: take(sp, idx)})


def _count(x, n_total: int | None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"fraction_or_count must be a float fraction or an int count, got {x!r}")
    if isinstance(x, (float, np.floating)):
        if n_total is None or not 0 < x <= 1:
            raise ValueError(f"fraction must be in (0, 1] (and per_class needs an int count), got {x}")
        return max(1, round(x * n_total))
    if x < 1:
        raise ValueError(f"count must be >= 1, got {x}")
    return int(x) if n_total is None else min(int(x), n_total)


def _per_class_pick(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())),
                        replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.arange(0)

"""The replay buffer: a class-balanced sample of the images a model lineage has seen.

One safetensors file, never a pickle:
    images    uint8   (N, C, H, W)   the stored images, as the data bundle holds them
    labels    int64   (N,)           head rows (class indices of the version that wrote it)
    logits    float32 (N, K)         the logits the model gave each image when it was stored (DER++);
                                     columns beyond logit_k[i] are 0 (classes added later)
    logit_k   int64   (N,)           how many classes the model had when image i was stored
    metadata["resforge"] = "replay-buffer"; metadata["meta"] = JSON: {format_version, lineage,
    class_names, capacity, selection, seen (per class: images offered so far, for reservoir
    sampling), seed}

Selection, per class, with capacity split evenly over the classes (class-balanced):
    reservoir  every image of a class offered so far has the same chance to be in the buffer
               (Vitter's algorithm R, run per class, with the per-class counts kept in `seen`)
    herding    iCaRL's exemplars (Rebuffi et al. 2017): greedily the images whose running mean
               of L2-normalised features is nearest the class mean; stored in that order, so
               shrinking a class keeps its best exemplars
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT = "replay-buffer"
FORMAT_VERSION = 1
SELECTIONS = ("reservoir", "herding")
MAX_CAPACITY = 10_000_000


class BufferError(ValueError):
    """A replay buffer file that is damaged, inconsistent, or of another model lineage."""


@dataclass
class ReplayBuffer:
    images: np.ndarray                 # uint8 (N, C, H, W)
    labels: np.ndarray                 # int64 (N,)
    logits: np.ndarray                 # float32 (N, K)
    logit_k: np.ndarray                # int64 (N,)
    class_names: list[str]
    lineage: str
    capacity: int
    selection: str = "reservoir"
    seen: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {n: int((self.labels == i).sum()) for i, n in enumerate(self.class_names)}


def empty(shape: tuple[int, int, int], class_names: list[str], lineage: str, capacity: int,
          selection: str = "reservoir", seed: int = 0) -> ReplayBuffer:
    _check_settings(capacity, selection)
    k = len(class_names)
    return ReplayBuffer(np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64), np.zeros((0, k), np.float32),
                        np.zeros(0, np.int64), list(class_names), lineage, capacity, selection, {}, seed)


def _check_settings(capacity: int, selection: str) -> None:
    if selection not in SELECTIONS:
        raise BufferError(f"buffer selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    if not isinstance(capacity, int) or not 0 <= capacity <= MAX_CAPACITY:
        raise BufferError(f"buffer capacity {capacity!r} must be a whole number of images in 0..{MAX_CAPACITY}")


def quotas(capacity: int, classes: list[int]) -> dict[int, int]:
    """Images per class: capacity // K each, the remainder to the first classes."""
    k = len(classes)
    if k == 0:
        return {}
    base, extra = divmod(capacity, k)
    return {c: base + (i < extra) for i, c in enumerate(sorted(classes))}


def grow_classes(buf: ReplayBuffer, class_names: list[str]) -> ReplayBuffer:
    """The buffer under the grown head's class list: its first len(buf.class_names) entries are the
    buffer's classes (possibly renamed: --rename), by position; logits padded with zeros."""
    k_old = len(buf.class_names)
    if len(class_names) < k_old:
        raise BufferError(f"the buffer has {k_old} classes but the model only {len(class_names)}")
    pad = len(class_names) - buf.logits.shape[1]
    logits = np.pad(buf.logits, ((0, 0), (0, pad))) if pad > 0 else buf.logits
    seen = {class_names[i]: buf.seen[n] for i, n in enumerate(buf.class_names) if n in buf.seen}
    return ReplayBuffer(buf.images, buf.labels, logits, buf.logit_k, list(class_names), buf.lineage, buf.capacity,
                        buf.selection, seen, buf.seed)


def update(buf: ReplayBuffer, images: np.ndarray, labels: np.ndarray, logits: np.ndarray,
           features: np.ndarray | None = None, *, capacity: int | None = None,
           buffer_features: np.ndarray | None = None) -> ReplayBuffer:
    """The buffer after offering it new images (uint8 (M, C, H, W), head labels (M,), the current
    model's logits (M, K), and for herding its features (M, D) and the buffer's (N, D)).

    Every class present in the buffer or the offer gets an equal share of `capacity` (default:
    the buffer's); a class over its share is cut (reservoir: at random; herding: its last
    exemplars), a class under it is filled from the offer."""
    capacity = buf.capacity if capacity is None else capacity
    _check_settings(capacity, buf.selection)
    k = len(buf.class_names)
    if logits.shape[1] != k or buf.logits.shape[1] != k:
        raise BufferError(f"logits have {logits.shape[1]} columns but the buffer has {k} classes: grow it first")
    if len(images) and images.shape[1:] != buf.images.shape[1:] and len(buf):
        raise BufferError(f"new images are {images.shape[1:]}, the buffer holds {buf.images.shape[1:]}")
    rng = np.random.default_rng([buf.seed, sum(buf.seen.values()), len(images)])
    classes = sorted(set(buf.labels.tolist()) | set(labels.tolist()))
    share = quotas(capacity, classes)
    keep_old, take_new, seen = [], [], dict(buf.seen)
    for c in classes:
        old = np.flatnonzero(buf.labels == c)
        new = np.flatnonzero(labels == c)
        name = buf.class_names[c]
        n_seen = seen.get(name, len(old))
        if buf.selection == "herding":
            feats_old = buffer_features[old] if len(old) else np.zeros((0, features.shape[1]), np.float32)
            pool = np.concatenate([feats_old, features[new]])
            order = herding_order(pool, share[c])
            keep_old += [old[i] for i in order if i < len(old)]
            take_new += [new[i - len(old)] for i in order if i >= len(old)]
        else:
            kept_o, kept_n = _reservoir(len(old), new, n_seen, share[c], rng)
            keep_old += [old[i] for i in kept_o]
            take_new += kept_n
        seen[name] = n_seen + len(new)
    keep_old, take_new = np.asarray(keep_old, np.int64), np.asarray(take_new, np.int64)
    n_shape = images.shape[1:] if len(images) else buf.images.shape[1:]
    return ReplayBuffer(
        np.concatenate([buf.images[keep_old].reshape(-1, *n_shape), images[take_new].reshape(-1, *n_shape)]),
        np.concatenate([buf.labels[keep_old], labels[take_new]]).astype(np.int64),
        np.concatenate([buf.logits[keep_old], logits[take_new]]).astype(np.float32),
        np.concatenate([buf.logit_k[keep_old], np.full(len(take_new), k, np.int64)]),
        list(buf.class_names), buf.lineage, capacity, buf.selection, seen, buf.seed)


def _reservoir(n_old: int, new: np.ndarray, n_seen: int, quota: int, rng) -> tuple[list[int], list[int]]:
    """Algorithm R per class: slots hold old items (positions 0..n_old-1) or new ones; each of the
    n_seen + len(new) items offered so far ends up in the quota slots with equal probability."""
    slots = [("o", i) for i in range(n_old)]
    if len(slots) > quota:                 # a smaller share than before: a uniform subset stays
        slots = [slots[i] for i in sorted(rng.choice(len(slots), quota, replace=False))]
    count = max(n_seen, n_old)
    for j in new:
        count += 1
        if len(slots) < quota:
            slots.append(("n", int(j)))
        else:
            r = int(rng.integers(0, count))
            if r < quota:
                slots[r] = ("n", int(j))
    return [i for t, i in slots if t == "o"], [i for t, i in slots if t == "n"]


def herding_order(features: np.ndarray, m: int) -> list[int]:
    """iCaRL herding: indices of up to m rows of `features` (n, D), each chosen so that the mean
    of the chosen (L2-normalised) rows gets nearest to the mean of all rows; in choice order."""
    n = len(features)
    if n == 0 or m <= 0:
        return []
    f = features.astype(np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    mu = f.mean(axis=0)
    chosen, total = [], np.zeros_like(mu)
    free = np.ones(n, bool)
    for t in range(1, min(m, n) + 1):
        dist = np.linalg.norm(mu[None] - (total[None] + f) / t, axis=1)
        dist[~free] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        free[i] = False
        total += f[i]
    return chosen


# ---------------------------------------------------------------- persistence

def save(buf: ReplayBuffer, path: str | Path) -> Path:
    """Write the buffer as one safetensors file (atomically)."""
    from safetensors.numpy import save as np_save
    from resforge.atomic import atomic_write
    meta = {"format_version": FORMAT_VERSION, "lineage": buf.lineage, "class_names": buf.class_names,
            "capacity": buf.capacity, "selection": buf.selection, "seen": buf.seen, "seed": buf.seed}
    tensors = {"images": np.ascontiguousarray(buf.images, np.uint8),
               "labels": np.ascontiguousarray(buf.labels, np.int64),
               "logits": np.ascontiguousarray(buf.logits, np.float32),
               "logit_k": np.ascontiguousarray(buf.logit_k, np.int64)}
    blob = np_save(tensors, metadata={"resforge": FORMAT, "meta": json.dumps(meta)})
    atomic_write(Path(path), blob)
    return Path(path)


def load(path: str | Path, *, lineage: str | None = None, class_names: list[str] | None = None,
         image_shape: tuple[int, int, int] | None = None) -> ReplayBuffer:
    """Read and validate a buffer file. lineage / class_names / image_shape: what the model that
    will replay it expects; a buffer of another lineage, other classes or other image size is
    refused with the reason (one BufferError naming the file)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as np_load
    path = Path(path)

    def bad(problem: str, fix: str = "delete it and update from a version whose buffer is intact"):
        raise BufferError(f"replay buffer {path}: {problem}; {fix}")

    try:
        blob = path.read_bytes()
    except OSError as e:
        bad(f"cannot be read ({e.strerror or e})")
    try:
        tensors = np_load(blob)
        header = _header(blob)
    except (SafetensorError, ValueError, OSError) as e:
        bad(f"is not a safetensors file ({str(e)[:100]})")
    if header.get("resforge") != FORMAT:
        bad(f"is not a resforge replay buffer (its metadata says {str(header.get('resforge'))[:40]!r})")
    try:
        meta = json.loads(header.get("meta", ""))
    except (ValueError, RecursionError):
        bad("has unreadable metadata JSON")
    if not isinstance(meta, dict):
        bad("metadata must be a JSON object")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        bad(f"format_version {meta.get('format_version')!r} is not one this resforge reads ({FORMAT_VERSION})")
    names = meta.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        bad("class_names must be a non-empty list of strings")
    if not isinstance(meta.get("lineage"), str):
        bad("lineage must be a string")
    if lineage is not None and meta["lineage"] != lineage:
        bad(f"belongs to model lineage {meta['lineage'][:12]}..., not {lineage[:12]}... of this model: a buffer "
            "holds the images and logits of the model it was made with",
            "update with the buffer of one of this model's own versions, or without one (--method naive/lwf)")
    if class_names is not None and list(class_names[:len(names)]) != names:
        bad(f"is for classes {names[:5]}, but the model's first classes are {list(class_names)[:5]}")
    for key in ("images", "labels", "logits", "logit_k"):
        if key not in tensors:
            bad(f"has no {key!r} tensor")
    x, y, lg, lk = tensors["images"], tensors["labels"], tensors["logits"], tensors["logit_k"]
    n, k = len(y), len(names)
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != n:
        bad(f"images must be uint8 (N, C, H, W) with N = {n} labels, found {x.dtype} {list(x.shape)}")
    if image_shape is not None and n and tuple(x.shape[1:]) != tuple(image_shape):
        bad(f"holds {list(x.shape[1:])} images but the model takes {list(image_shape)}")
    if y.dtype != np.int64 or y.ndim != 1 or (n and not (0 <= y.min() and y.max() < k)):
        bad(f"labels must be int64 class indices in 0..{k - 1}")
    if lg.dtype != np.float32 or lg.shape != (n, k) or not np.isfinite(lg).all():
        bad(f"logits must be finite float32 of shape [{n}, {k}], found {lg.dtype} {list(lg.shape)}")
    if lk.dtype != np.int64 or lk.shape != (n,) or (n and not (1 <= lk.min() and lk.max() <= k)):
        bad(f"logit_k must be int64 counts in 1..{k}")
    cap, sel = meta.get("capacity"), meta.get("selection")
    if not isinstance(cap, int) or isinstance(cap, bool) or not n <= cap <= MAX_CAPACITY:
        bad(f"capacity {cap!r} must be a whole number at least the {n} images held")
    if sel not in SELECTIONS:
        bad(f"selection {sel!r} is not one of {', '.join(SELECTIONS)}")
    seen = meta.get("seen", {})
    if not (isinstance(seen, dict) and all(isinstance(v, int) and v >= 0 for v in seen.values())):
        bad("seen must map class names to counts")
    seed = meta.get("seed", 0)
    return ReplayBuffer(np.array(x), np.array(y), np.array(lg), np.array(lk), list(names), meta["lineage"], cap,
                        sel, dict(seen), int(seed) if isinstance(seed, int) else 0)


def _header(blob: bytes) -> dict:
    """The __metadata__ of a safetensors blob (8-byte little-endian length, then JSON)."""
    if len(blob) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError("header length beyond the file")
    head = json.loads(blob[8:8 + n])
    meta = head.get("__metadata__", {}) if isinstance(head, dict) else {}
    return meta if isinstance(meta, dict) else {}


def as_tensors(buf: ReplayBuffer, device) -> dict[str, torch.Tensor]:
    """The buffer on `device` for replay: images, labels, logits, logit_k."""
    return {"images": torch.from_numpy(buf.images).to(device), "labels": torch.from_numpy(buf.labels).to(device),
            "logits": torch.from_numpy(buf.logits).to(device), "logit_k": torch.from_numpy(buf.logit_k).to(device)}

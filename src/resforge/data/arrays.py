"""Sources that are already arrays: sklearn digits and MedMNIST-style .npz files.

Builders return "parts" (plain dicts, see sources.py) with uint8 (N, C, H, W) images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def digits_parts() -> dict:
    """sklearn's 8x8 digits, 16 grey levels -> 0..255, stratified 80/20 train/test (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]   # (1797, 1, 8, 8)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    # Fixed seed and fraction: the test split is part of the dataset definition, never changes.
    train, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=0)
    splits = {name: _split(images, labels, np.sort(i), "digits") for name, i in
              (("train", train), ("test", test))}
    return {"name": "digits", "class_names": [str(k) for k in range(10)], "splits": splits}


def _split(images, labels, idx, prefix) -> dict:
    return {"images": images[idx], "labels": labels[idx],
            "ids": [f"{prefix}:{i}" for i in idx], "files": None}


def npz_parts(path: Path) -> dict:
    """{train,val,test}_images (N,H,W) or (N,H,W,C) uint8 + {split}_labels (N,) or (N,1)."""
    try:
        npz = np.load(path, allow_pickle=False)  # never unpickle objects from a data file
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    with npz:
        present = [s for s in SPLITS if f"{s}_images" in npz.files]
        if not present:
            raise ValueError(f"{path}: no 'train_images'/'val_images'/'test_images' key "
                             f"(keys: {sorted(npz.files)}); save arrays under those names")
        names = _npz_class_names(npz, path)
        splits = {s: _npz_split(npz, s, path) for s in present}
    top = max(int(p["labels"].max(initial=-1)) for p in splits.values())
    k = len(names) if names is not None else top + 1        # classes = 0..max label by default
    for s, p in splits.items():
        _check_labels(p["labels"], k, f"{path}: '{s}_labels'",
                      "class_names" if names is not None else None)
    _check_same_shape(splits, path)
    return {"name": path.stem, "class_names": names or [str(i) for i in range(k)], "splits": splits}


def _npz_class_names(npz, path) -> list[str] | None:
    for key in ("class_names", "labels"):
        if key in npz.files:
            try:
                arr = npz[key]
            except ValueError:
                raise ValueError(f"{path}: '{key}' is an object array; store class names as a "
                                 "string array, e.g. np.array(names, dtype=str)") from None
            if arr.dtype.kind not in "US":
                raise ValueError(f"{path}: '{key}' must hold class names as strings, got {arr.dtype}")
            return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    return None


def _get(npz, key: str, path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError:  # object arrays need pickle, which we refuse for data files
        raise ValueError(f"{path}: '{key}' is an object array (it would need pickle, refused for "
                         "safety); save it as a numeric array") from None


def _npz_split(npz, split: str, path) -> dict:
    images, lkey = _get(npz, f"{split}_images", path), f"{split}_labels"
    if lkey not in npz.files:
        raise ValueError(f"{path}: has '{split}_images' but no '{lkey}'")
    labels = _int_labels(_get(npz, lkey, path), f"{path}: '{lkey}'")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: '{split}_images' is {images.dtype}, expected uint8; convert "
                         "with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for 0..1 floats")
    if images.ndim == 3:
        images = images[..., None]                       # (N, H, W) -> (N, H, W, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: '{split}_images' has shape {images.shape}; "
                         "expected (N, H, W) or (N, H, W, C) with C = 1 or 3")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} '{split}_images' but {len(labels)} '{lkey}'")
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return {"images": nchw, "labels": labels, "ids": [f"{split}:{i}" for i in range(len(labels))],
            "files": None}


def _int_labels(raw: np.ndarray, what: str) -> np.ndarray:
    """(N,) or (N, 1) integer-valued -> int64 (N,)."""
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise ValueError(f"{what} has shape {raw.shape}; expected (N,) or (N, 1) class indices "
                         "(multi-label data is not supported)")
    if raw.dtype.kind in "iub":
        return raw.astype(np.int64)
    if raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)):
        return raw.astype(np.int64)
    bad = np.flatnonzero(~(np.isfinite(raw) & (raw == np.round(raw)))) if raw.dtype.kind == "f" else [0]
    raise ValueError(f"{what} must be integer class indices; got dtype {raw.dtype} "
                     f"(e.g. item {int(bad[0])} = {raw[int(bad[0])]!r})")


def _check_labels(labels: np.ndarray, k: int, what: str, names_key: str | None) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if len(bad):
        i = int(bad[0])
        hint = f"there are {k} names in '{names_key}'" if names_key else "labels must be >= 0"
        raise ValueError(f"{what}: {len(bad)} labels out of range 0..{k - 1} "
                         f"(e.g. item {i} = {labels[i]}); {hint}")


def _check_same_shape(splits: dict, path) -> None:
    shapes = {s: p["images"].shape[1:] for s, p in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{path}: splits have different image shapes (C, H, W) {shapes}")

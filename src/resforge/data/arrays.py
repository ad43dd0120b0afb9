"""Sources that are already arrays: sklearn digits and MedMNIST-style .npz files.

Builders return "parts" (plain dicts, see sources.py) with uint8 (N, C, H, W) images.
"""
from __future__ import annotations

import math
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .limits import DataLimits

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


# One pool of images with no split of its own (the val and test splits are then carved from it,
# stratified): the array pairs that libraries and tutorials save most often.
POOLS = (("x", "y"), ("X", "y"), ("images", "labels"))


def npz_keys(headers) -> dict[str, tuple[str, str]]:
    """{split: (images key, labels key)}: {train,val,test}_images/_labels, else one pool (POOLS) as train."""
    keys = {s: (f"{s}_images", f"{s}_labels") for s in SPLITS if f"{s}_images" in headers}
    if not keys:
        pool = next(((i, l) for i, l in POOLS if i in headers and l in headers
                     and headers[l][1].kind in "iub"), None)
        keys = {"train": pool} if pool else {}
    return keys


def npz_parts(path: Path, limits: DataLimits | None = None) -> dict:
    """{train,val,test}_images + {split}_labels, or one pool (x/y, X/y, images/labels: carved into
    train/val/test): images (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1 or 3, uint8 (or integers in
    0..255); labels (N,) or (N,1) class indices; optional class_names.

    Every array's declared shape and dtype are read from its .npy header and checked against
    the limits before anything is allocated; a damaged archive is one sentence naming the file.
    """
    limits = limits or DataLimits.from_env()
    headers = _npz_headers(path)
    keys = npz_keys(headers)
    if not keys:
        raise ValueError(f"{path}: no 'train_images'/'val_images'/'test_images' key and no image/label pair "
                         f"({', '.join(f'{i}/{l}' for i, l in POOLS)}) (keys: {sorted(headers)}); save arrays "
                         "under those names")
    _check_declared(headers, keys, path, limits)
    try:
        npz = np.load(path, allow_pickle=False)  # never unpickle objects from a data file
    except (*_ZIP_ERRORS, ValueError) as e:
        raise _damaged(path, e) from None
    with npz:
        names = _npz_class_names(npz, path, skip={l for _, l in keys.values()})
        splits = {s: _npz_split(npz, s, path, *k) for s, k in keys.items()}
    k = _num_classes(splits, names, path, limits)
    for s, p in splits.items():
        _check_labels(p["labels"], k, f"{path}: '{s}_labels'",
                      "class_names" if names is not None else None)
    _check_same_shape(splits, path)
    return {"name": path.stem, "class_names": names or [str(i) for i in range(k)], "splits": splits}


# what a damaged zip / .npy member raises while being read (CRC, truncation, bad deflate data)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError)


def _damaged(path, e: BaseException) -> ValueError:
    return ValueError(f"{path}: damaged or not an .npz file ({type(e).__name__}: {e}); re-create it with "
                      "np.savez / np.savez_compressed, or re-download it")


def _npz_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (declared shape, dtype)} from each member's .npy header, without reading its data."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = npy_format.read_magic(f)
                    read = npy_format.read_array_header_1_0 if version == (1, 0) \
                        else npy_format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[info.filename[:-4]] = (tuple(int(d) for d in shape), dtype)
    except (*_ZIP_ERRORS, ValueError) as e:
        raise _damaged(path, e) from None
    return out


def _check_declared(headers: dict, keys: dict, path: Path, limits: DataLimits) -> None:
    """Refuse absurd or zero-size declared shapes and data sets larger than the byte limit."""
    total = 0
    for ikey, lkey in keys.values():
        for key in (ikey, lkey):
            if key not in headers:
                continue
            shape, dtype = headers[key]
            if dtype.hasobject:
                continue  # refused with its own sentence when read (no pickle)
            hw = _hw(shape)
            if key == ikey and hw is not None and 0 in hw:
                raise ValueError(f"{path}: '{key}' has shape {shape}: images of zero size "
                                 f"{hw[0]}x{hw[1]}; every image needs at least 1x1 pixels")
            if key == ikey and hw is not None:
                limits.check_side(hw, f"{path}: '{key}'")
            total += math.prod(shape) * dtype.itemsize
    labels = {lkey for _, lkey in keys.values()}
    for key in ("class_names", "labels"):  # class-name arrays: K strings
        if key in headers and key not in labels:
            limits.check_classes(math.prod(headers[key][0]), f"{path}: '{key}'")
            total += math.prod(headers[key][0]) * headers[key][1].itemsize
    limits.check_bytes(total, f"{path}: the arrays it declares (shapes "
                       + ", ".join(f"{k} {headers[k][0]}" for s in keys for k in
                                   keys[s] if k in headers) + ")")


def _num_classes(splits: dict, names: list[str] | None, path: Path, limits: DataLimits) -> int:
    """K: len(class_names), else max label + 1, refusing label sets far sparser than 0..K-1."""
    if names is not None:
        limits.check_classes(len(names), f"{path}: 'class_names'")
        return len(names)
    labels = np.concatenate([p["labels"] for p in splits.values()])
    if len(labels) == 0:
        return 0
    top = int(labels.max())
    if top < 0:
        return 0  # every label negative: _check_labels names one
    where = next((s, int(np.argmax(p["labels"]))) for s, p in splits.items()
                 if len(p["labels"]) and int(p["labels"].max()) == top)
    used = np.unique(labels[labels >= 0])
    k = top + 1
    if k > 2 * len(used):  # more than half of 0..K-1 unused: not class indices
        raise ValueError(f"{path}: label {top} (item {where[1]} of '{where[0]}_labels') implies {k} "
                         f"classes but only {len(used)} distinct labels are used; labels must be "
                         "class indices 0..K-1: remap them (e.g. np.unique(labels, return_inverse=True))")
    limits.check_classes(k, f"{path}: label {top} (item {where[1]} of '{where[0]}_labels')")
    unused = sorted(set(range(k)) - set(used.tolist()))
    if unused:
        warnings.warn(f"{path}: classes {unused[:10]}{' ...' if len(unused) > 10 else ''} have no "
                      f"items in any split (labels run 0..{top}); the model still gets {k} outputs")
    return k


def _hw(shape: tuple) -> tuple[int, int] | None:
    """(H, W) of an image stack's declared shape: (N,H,W), (N,H,W,C), or (N,C,H,W) when only the
    second axis can be channels (C = 1 or 3 there, not last)."""
    if len(shape) == 3:
        return shape[1], shape[2]
    if len(shape) == 4:
        return (shape[2], shape[3]) if _channels_first(shape) else (shape[1], shape[2])
    return None


def _channels_first(shape: tuple) -> bool:
    return len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3)


def _npz_class_names(npz, path, skip: set[str] = frozenset()) -> list[str] | None:
    for key in ("class_names", "labels"):
        if key in npz.files and key not in skip:
            arr = _get(npz, key, path, "store class names as a string array, e.g. "
                                          "np.array(names, dtype=str)")
            if arr.dtype.kind not in "US":
                raise ValueError(f"{path}: '{key}' must hold class names as strings, got {arr.dtype}")
            return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    return None


def _get(npz, key: str, path, fix: str = "save it as a numeric array") -> np.ndarray:
    """The one place array data is read: damage and object arrays become one sentence."""
    try:
        return npz[key]
    except ValueError as e:
        if "allow_pickle" in str(e):  # object arrays need pickle, which we refuse for data files
            raise ValueError(f"{path}: '{key}' is an object array (it would need pickle, refused for "
                             f"safety); {fix}") from None
        raise _damaged(path, e) from None
    except _ZIP_ERRORS as e:
        raise _damaged(path, e) from None


def _npz_split(npz, split: str, path, ikey: str, lkey: str) -> dict:
    images = _get(npz, ikey, path)
    if lkey not in npz.files:
        raise ValueError(f"{path}: has '{ikey}' but no '{lkey}'")
    labels = _int_labels(_get(npz, lkey, path), f"{path}: '{lkey}'")
    images = _uint8_images(images, f"{path}: '{ikey}'")
    if images.ndim == 3:
        images = images[..., None]                       # (N, H, W) -> (N, H, W, 1)
    elif _channels_first(images.shape):
        images = images.transpose(0, 2, 3, 1)            # (N, C, H, W) -> (N, H, W, C)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: '{ikey}' has shape {images.shape}; "
                         "expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} '{ikey}' but {len(labels)} '{lkey}'")
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return {"images": nchw, "labels": labels, "ids": [f"{split}:{i}" for i in range(len(labels))],
            "files": None}


def _uint8_images(images: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; integer arrays whose values all lie in 0..255 are cast; anything else
    (floats, whose scale 0..1 or 0..255 cannot be guessed, NaN, out-of-range) is refused."""
    if images.dtype == np.uint8:
        return images
    convert = "convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for 0..1 floats"
    if images.dtype.kind in "iub":
        lo, hi = (int(images.min()), int(images.max())) if images.size else (0, 0)
        if 0 <= lo and hi <= 255:
            return images.astype(np.uint8)
        raise ValueError(f"{what} is {images.dtype} with values {lo}..{hi}, outside 0..255; "
                         "store 8-bit pixel values as uint8")
    if images.dtype.kind == "f":
        nan = int(np.count_nonzero(~np.isfinite(images)))
        if nan:
            first = int(np.flatnonzero((~np.isfinite(images.reshape(len(images), -1))).any(axis=1))[0])
            raise ValueError(f"{what} has {nan} NaN/infinite values (first in item {first}); "
                             f"images must be uint8 0..255 pixel values: fix or drop those items")
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1.0:
            fix = convert
        elif lo >= 0 and hi <= 255:
            fix = "convert with np.clip(np.round(x), 0, 255).astype(np.uint8)"
        else:
            fix = "values outside 0..255 cannot be pixels: rescale them to 0..255 first"
        raise ValueError(f"{what} is {images.dtype} (values {lo:g}..{hi:g}), expected uint8 0..255; {fix}")
    raise ValueError(f"{what} is {images.dtype}, expected uint8 0..255 pixel values")


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

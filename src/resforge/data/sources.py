"""load_source(spec) -> DataBundle: one entry point for every supported data source.

Specs: "digits" | "cifar10" | "cifar100" | path to a CIFAR archive/folder | path to a .npz |
path to an ImageFolder tree. Decoded uint8 tensors go through the on-disk cache (cache.py)
keyed by the fingerprint (source content hash + decode settings), so a second load of the same
source maps the cached arrays instead of decoding again.

Internally every builder returns "parts": {"name", "class_names", "splits": {split: {"images",
"labels", "ids", "files"}}} plus optional "channels", "image_size", "rejected", "extra".
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import arrays, cache, cifar, folder
from .images import RESIZE_MODES, convert_channels, resize_image
from .limits import DataLimits
from .paths import display_name, not_regular_reason

SOURCE_VERSION = 1  # bump when decoding changes, so old cache entries are not reused


@dataclass
class Split:
    labels: np.ndarray            # int64 (N,)
    images: np.ndarray | None     # uint8 (N, C, H, W), possibly np.memmap; None for streamed splits
    files: list[str] | None       # source file per item (ImageFolder) or None
    ids: list[str]                # stable item ids ("data_batch_1.bin:17", "train/cat/x.jpg", "train:5")


@dataclass
class DataBundle:
    name: str                      # "digits", "cifar10", folder name, npz stem
    class_names: list[str]
    splits: dict[str, Split]       # keys among "train", "val", "test"
    channels: int
    image_size: tuple[int, int]    # (H, W) of the stored uint8 tensors
    fingerprint: str               # sha256 of the source content (+ decode settings)
    rejected: list[dict]           # [{"path": ..., "reason": ...}] never silently dropped
    extra: dict = field(default_factory=dict)  # e.g. {"ignored": 3, "resize": ...}


def load_source(spec, *, image_size=None, channels=None, cache_dir=None, download=False,
                data_root=None, stream=False, resize="shorter-center-crop",
                limits: DataLimits | None = None, min_classes: int = 2) -> DataBundle:
    """Load a data source as uint8 (N, C, H, W) splits; see the module docstring for specs.

    image_size: (H, W) or int to resize to; channels: 1 or 3 to convert to; None keeps the
    source's own (folders: most common size; 1 channel only if every image is grayscale).
    stream: folders only, keep file lists instead of decoding (images=None).
    limits: bounds on classes, image side and decoded bytes (limits.py; default from_env()).
    A source must have at least two classes with items: a one-class "classifier" is refused
    (min_classes=1: a support set of new classes for `resforge fewshot`, where one is enough).
    """
    limits = limits or DataLimits.from_env()
    settings = _settings(image_size, channels, resize)
    if settings["image_size"] is not None:
        limits.check_side(settings["image_size"], "requested data.image_size")
    kind, path = _resolve(spec, data_root, download)
    if kind == "folder":
        return _load_folder(path, settings, cache_dir, stream, limits, min_classes)
    if stream:
        raise ValueError(f"stream=True is for image folders only; {spec!r} is a {kind} source "
                         "and is loaded into memory")
    content = _content_hash(kind, path, cache_dir)
    fp = cache.settings_hash("resforge-data", SOURCE_VERSION, kind, content, settings)
    hit = cache.read_entry(cache_dir, fp)
    if hit is not None:
        return _from_cache(hit, fp)
    parts = {"digits": lambda: arrays.digits_parts(), "npz": lambda: arrays.npz_parts(path, limits),
             "cifar": lambda: cifar.read_cifar(path)}[kind]()
    if kind in ("cifar", "npz"):  # where the entry came from (`resforge cache list`)
        parts["extra"] = {**parts.get("extra", {}), "path": str(path)}
    check_classes(parts, str(path) if path is not None else kind, limits, min_classes)
    return _store(_conform(parts, settings, limits), fp, cache_dir)


def check_classes(parts: dict, source: str, limits: DataLimits | None = None, min_classes: int = 2) -> None:
    """A classifier needs >= 2 classes with items; one class would "train" to 100% and mean nothing."""
    (limits or DataLimits.from_env()).check_classes(len(parts["class_names"]), source)
    used = sorted({int(v) for p in parts["splits"].values() for v in np.unique(p["labels"])})
    if len(used) < min_classes:
        names = parts["class_names"]
        what = f"only one class ({names[used[0]]!r})" if used else "no labelled items"
        raise ValueError(f"{source}: {what}; a classifier needs at least 2 classes with images, "
                         "so add the other classes (one folder or label per class)")


def read_class_names(names_file, limits: DataLimits | None = None) -> list[str]:
    """Class names from a text file, one per line in label order 0..K-1 (read before any decoding,
    so a bad file fails in a second, not after a long decode)."""
    path = Path(names_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise ValueError(f"class names file {display_name(path)}: cannot read it ({why}); pass a UTF-8 "
                         "text file, one class name per line") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    blank = next((i for i, n in enumerate(names) if not n), None)
    if not names or blank is not None:
        where = "it is empty" if not names else f"line {blank + 1} is blank"
        raise ValueError(f"class names file {display_name(path)}: {where}; write one class name per line")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ValueError(f"class names file {display_name(path)}: {dup!r} appears twice; class names must differ")
    (limits or DataLimits.from_env()).check_classes(len(names), f"class names file {display_name(path)}")
    return names


def apply_class_names(bundle: DataBundle, names: list[str], names_file) -> DataBundle:
    """Name the classes (data.class_names): for sources that carry no names (an .npz without a
    'class_names' array gets "0".."K-1") or to rename. The count must match the source's K; it
    may exceed it only when the source had no names (classes without items in any split)."""
    k = len(bundle.class_names)
    unnamed = bundle.class_names == [str(i) for i in range(k)]
    if len(names) < k or (len(names) > k and not unnamed):
        raise ValueError(f"class names file {display_name(Path(names_file))} has {len(names)} names but "
                         f"{bundle.name} has {k} classes; give exactly one name per class, in label order "
                         f"0..{k - 1}")
    bundle.class_names = list(names)
    return bundle


def _settings(image_size, channels, resize) -> dict:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (H, W) of positive ints or an int, got {image_size}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return {"image_size": image_size, "channels": channels, "resize": resize}


def _resolve(spec, data_root, download) -> tuple[str, Path | None]:
    """spec -> (kind, path): kind in digits / cifar / npz / folder."""
    if spec == "digits":
        return "digits", None
    if spec in cifar.CIFAR_NAMES:
        root = Path(data_root) if data_root is not None else cifar.default_data_root()
        found = cifar.find_cifar(spec, root)
        if found is None and download:
            found = cifar.download_cifar(cifar.CIFAR_NAMES[spec][1][0], root)
        if found is None:
            raise FileNotFoundError(cifar.not_found_message(spec, root))
        return "cifar", found
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {str(spec)!r} not found: expected 'digits', 'cifar10', "
                                "'cifar100', or an existing .npz file, CIFAR archive or image folder")
    odd = None if path.is_dir() else not_regular_reason(path)
    if odd is not None:  # a FIFO / device source would block or never end when read
        raise ValueError(f"data source {display_name(path)}: {odd}; pass a file, folder or data set name")
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz", path
    if cifar.looks_like_cifar(path):
        return "cifar", path
    if path.is_dir():
        return "folder", path
    raise ValueError(f"{path}: unsupported file; expected a .npz, a CIFAR tar archive "
                     "(e.g. cifar-10-binary.tar.gz / .tar.xz) or an image folder")


def _content_hash(kind: str, path: Path | None, cache_dir) -> str:
    if kind == "digits":  # tiny and bundled with sklearn: hash the arrays themselves
        h = hashlib.sha256()
        for p in arrays.digits_parts()["splits"].values():
            h.update(p["images"].tobytes())
            h.update(p["labels"].tobytes())
        return h.hexdigest()
    if path.is_dir():  # extracted CIFAR folder: hash of its files
        return cache.settings_hash([(p.name, cache.file_sha256(p, cache_dir))
                                    for p in sorted(path.iterdir()) if p.is_file()])
    return cache.file_sha256(path, cache_dir)


def _load_folder(path: Path, settings: dict, cache_dir, stream: bool, limits: DataLimits,
                 min_classes: int = 2) -> DataBundle:
    listing = folder.list_tree(path)
    if stream:  # every file was decode-checked once; the memo skips that for an unchanged tree
        key = folder.listing_key(listing, {"version": SOURCE_VERSION, "kind": "checked"})
        memo = cache.memo_get(cache_dir, key)
        parts = folder.stream_tree(listing, settings, limits=limits,
                                   checked=memo.get("checked") if memo else None)
        if memo is None:
            cache.memo_put(cache_dir, key, {"checked": parts["checked"]})
        parts.pop("checked")
        check_classes(parts, str(path), limits, min_classes)
        return _bundle(parts, parts.pop("fingerprint"))
    key = folder.listing_key(listing, {**settings, "version": SOURCE_VERSION})
    hit, fp = _memo_entry(cache_dir, key)
    if hit is not None:         # cached by a caller that may have allowed fewer classes: check again
        bundle = _rebase(_from_cache(hit, fp), path)
        check_classes({"class_names": bundle.class_names,
                       "splits": {s: {"labels": sp.labels} for s, sp in bundle.splits.items()}},
                      str(path), limits, min_classes)
        return bundle
    base = _native_entry(listing, settings, cache_dir)
    if base is not None:
        parts, fp = _derive(base, settings, limits)
        check_classes(parts, str(path), limits, min_classes)
    else:
        parts = folder.decode_tree(listing, settings, limits=limits)
        check_classes(parts, str(path), limits, min_classes)
        fp = cache.settings_hash("resforge-data", SOURCE_VERSION, parts.pop("fingerprint"))
    bundle = _store(parts, fp, cache_dir)
    cache.memo_put(cache_dir, key, {"fingerprint": fp})
    return _rebase(bundle, path)


def _memo_entry(cache_dir, key: str) -> tuple[dict | None, str | None]:
    memo = cache.memo_get(cache_dir, key)
    fp = memo.get("fingerprint") if memo else None
    return (cache.read_entry(cache_dir, fp) if fp else None), fp


def _native_entry(listing: dict, settings: dict, cache_dir) -> dict | None:
    """The cached native-size entry of this same folder listing (same channels and resize mode),
    if decoding it resized no image: resizing its pixels is then exactly what decoding each file
    at the requested size gives (the same resize_image on the same decoded array)."""
    if settings["image_size"] is None:
        return None
    key = folder.listing_key(listing, {**settings, "image_size": None, "version": SOURCE_VERSION})
    hit, _ = _memo_entry(cache_dir, key)
    derive = hit["meta"].get("derive") if hit else None
    return hit if derive and not derive["resized"] else None


def _derive(base: dict, settings: dict, limits: DataLimits) -> tuple[dict, str]:
    """parts at settings["image_size"] resized from a native entry, and the fingerprint a fresh
    decode would give (same file list and hashes, these settings), so manifests still match."""
    meta, size = base["meta"], tuple(settings["image_size"])
    n = sum(len(labels) for _, labels in base["arrays"].values())
    limits.check_bytes(n * meta["channels"] * size[0] * size[1],
                       f"{meta['name']}: {n} images at {meta['channels']}x{size[0]}x{size[1]}")
    splits = {s: {"images": conform_images(images, None, size, settings["resize"]), "labels": labels,
                  "ids": meta["splits"][s]["ids"], "files": meta["splits"][s]["files"]}
              for s, (images, labels) in base["arrays"].items()}
    parts = {"name": meta["name"], "class_names": meta["class_names"], "splits": splits,
             "channels": meta["channels"], "image_size": size, "rejected": meta["rejected"],
             "extra": meta["extra"]}
    entries = meta["derive"]["entries"]
    fp = cache.settings_hash("resforge-data", SOURCE_VERSION, cache.settings_hash(
        "folder", entries, settings, meta["channels"], list(size)))
    return parts, fp


def _rebase(bundle: DataBundle, root: Path) -> DataBundle:
    """The fingerprint is content-only, so the same images under another folder share a cache
    entry; file paths must still point into *this* folder (ids are relative to the root)."""
    for sp in bundle.splits.values():
        if sp.files is not None:
            sp.files = [str(root / i) for i in sp.ids]
    for r in bundle.rejected:
        if "id" in r:
            r["path"] = display_name(root / r["id"])
    return bundle


def _conform(parts: dict, settings: dict, limits: DataLimits) -> dict:
    """Apply requested channels / image_size to array sources (uint8 N, C, H, W)."""
    size, channels = settings["image_size"], settings["channels"]
    if size is not None or channels is not None:
        n = sum(len(p["images"]) for p in parts["splits"].values())
        _, c, h, w = next(iter(parts["splits"].values()))["images"].shape
        limits.check_bytes(n * (channels or c) * math.prod(size or (h, w)),
                           f"{parts['name']} at {channels or c}x{(size or (h, w))[0]}x{(size or (h, w))[1]}")
    for split in parts["splits"].values():
        split["images"] = conform_images(split["images"], channels, size, settings["resize"])
    return parts


def conform_images(images: np.ndarray, channels=None, size=None, resize="shorter-center-crop",
                   chunk: int = 4096) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, channels, *size); no-op (same array) when nothing changes."""
    n, c, h, w = images.shape
    if (channels in (None, c)) and (size is None or tuple(size) == (h, w)):
        return images
    out = np.empty((n, channels or c, *(size or (h, w))), np.uint8)
    for start in range(0, n, chunk):  # chunks bound the float temporaries of the luma step
        hwc = convert_channels(images[start:start + chunk].transpose(0, 2, 3, 1), channels)
        if size is not None:
            hwc = np.stack([resize_image(x, size, resize) for x in hwc]) if len(hwc) else hwc
        out[start:start + len(hwc)] = hwc.transpose(0, 3, 1, 2)
    return out


def _store(parts: dict, fp: str, cache_dir) -> DataBundle:
    """Write parts to the cache and return the memmap-backed bundle (in memory if unwritable)."""
    bundle = _bundle(parts, fp)
    meta = {"name": bundle.name, "class_names": bundle.class_names, "channels": bundle.channels,
            "image_size": list(bundle.image_size), "rejected": bundle.rejected, "extra": bundle.extra,
            "splits": {s: {"ids": sp.ids, "files": sp.files} for s, sp in bundle.splits.items()}}
    if parts.get("derive"):
        meta["derive"] = parts["derive"]
    arrays_ = {s: (sp.images, sp.labels) for s, sp in bundle.splits.items()}
    try:
        cache.write_entry(cache_dir, fp, meta, arrays_)
    except OSError as e:
        warnings.warn(f"could not write the data cache in {cache.resolve_cache_dir(cache_dir)} ({e}); "
                      "continuing in memory (set RESFORGE_CACHE to a writable folder)")
        return bundle
    return _from_cache(cache.read_entry(cache_dir, fp), fp)


def _bundle(parts: dict, fp: str) -> DataBundle:
    splits = {s: Split(labels=np.asarray(p["labels"], np.int64), images=p["images"],
                       files=p["files"], ids=list(p["ids"])) for s, p in parts["splits"].items()}
    first = next(iter(splits.values()))
    channels = parts.get("channels") or first.images.shape[1]
    size = parts.get("image_size") or first.images.shape[2:]
    return DataBundle(name=parts["name"], class_names=list(parts["class_names"]), splits=splits,
                      channels=int(channels), image_size=(int(size[0]), int(size[1])),
                      fingerprint=fp, rejected=list(parts.get("rejected", [])),
                      extra=dict(parts.get("extra", {})))


def _from_cache(hit: dict, fp: str) -> DataBundle:
    meta = hit["meta"]
    splits = {s: Split(labels=labels, images=images, files=meta["splits"][s]["files"],
                       ids=meta["splits"][s]["ids"]) for s, (images, labels) in hit["arrays"].items()}
    return DataBundle(name=meta["name"], class_names=meta["class_names"], splits=splits,
                      channels=meta["channels"], image_size=tuple(meta["image_size"]),
                      fingerprint=fp, rejected=meta["rejected"], extra=meta["extra"])

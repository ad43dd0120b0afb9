"""`resforge data scan`: what a data source contains and what is wrong with it.

Duplicates are exact: identical decoded uint8 pixels (after resizing/conversion) and, for
file sources, identical file bytes. A duplicate group spanning train/val/test is leakage.

Memory stays bounded for image folders: they are loaded as streamed bundles (file lists, every
file decode-checked) and hashed one file at a time, so no (N, C, H, W) tensor is built; the
fingerprint shown is then the streamed one (paths, sizes, mtimes).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .cifar import looks_like_cifar
from .images import ImageError, decode_image, resize_image
from .paths import display_name
from ..progress import track
from .sources import DataBundle, load_source


def scan(spec, **load_kwargs) -> dict:
    """Load `spec` (or take a DataBundle) and report counts, rejects and duplicates."""
    if isinstance(spec, DataBundle):
        bundle = spec
    else:
        stream = _is_folder(spec) or load_kwargs.get("stream", False)
        bundle = load_source(spec, **{**load_kwargs, "stream": stream})
    report = {
        "source": bundle.name, "fingerprint": bundle.fingerprint, "channels": bundle.channels,
        "image_size": list(bundle.image_size), "class_names": list(bundle.class_names),
        "counts": _counts(bundle), "rejected": list(bundle.rejected),
        "ignored": int(bundle.extra.get("ignored", 0)), "duplicates": {}, "leaks": {}}
    for kind, hasher in (("pixels", _pixel_hashes), ("files", _file_hashes)):
        hashes = {s: hasher(sp, bundle, report["rejected"]) for s, sp in bundle.splits.items()}
        hashes = {s: h for s, h in hashes.items() if h is not None}
        if hashes:
            within, across = _duplicates(bundle, hashes)
            report["duplicates"][kind], report["leaks"][kind] = within, across
    return report


def _counts(bundle) -> dict:
    """{split: {class name: count}} (every class listed, zeros included)."""
    k = len(bundle.class_names)
    return {s: dict(zip(bundle.class_names, np.bincount(sp.labels, minlength=k).tolist()))
            for s, sp in bundle.splits.items()}


def _is_folder(spec) -> bool:
    if not isinstance(spec, (str, os.PathLike)):
        return False
    path = Path(spec).expanduser()
    return path.is_dir() and not looks_like_cifar(path)


def _pixel_hash(img: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest()


def _pixel_hashes(split, bundle, rejected) -> list[bytes] | None:
    if split.images is not None:
        return [_pixel_hash(img) for img in track(split.images, "scanning: hashing pixels")]  # img: (C, H, W)
    if split.files is None:
        return None
    resize = bundle.extra.get("resize", "shorter-center-crop")

    def one(path):  # decode, resize and hash one file: only the thread pool's images in memory
        try:
            arr = resize_image(decode_image(path, bundle.channels), bundle.image_size, resize)
        except ImageError as e:  # changed since the load's check: reported, hashed as unique
            rejected.append({"path": display_name(e.path), "reason": display_name(e.reason)})
            return hashlib.blake2b(str(path).encode("utf-8", "backslashreplace")).digest()
        return _pixel_hash(arr.transpose(2, 0, 1))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(track(pool.map(one, split.files), "scanning: decoding and hashing images",
                          total=len(split.files)))


def _file_hashes(split, bundle=None, rejected=None) -> list[bytes] | None:
    if split.files is None:
        return None
    return [_file_hash(f) for f in track(split.files, "scanning: hashing files", unit="file")]


def _file_hash(path, chunk: int = 1 << 20) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def _duplicates(bundle, hashes: dict) -> tuple[dict, list]:
    """Within-split groups {split: [[ids]]} and cross-split groups [{split: [ids]}]."""
    groups = defaultdict(lambda: defaultdict(list))                    # hash -> split -> ids
    for s, hs in hashes.items():
        ids = bundle.splits[s].ids
        for item, h in zip(ids, hs):
            groups[h][s].append(item)
    within = {s: [g[s] for g in groups.values() if len(g.get(s, ())) > 1] for s in hashes}
    across = [dict(g) for g in groups.values() if len(g) > 1]
    return within, across


def format_scan(report: dict, max_items: int = 10) -> str:
    """Readable text: per-class count table, then rejects, ignored count, duplicates, leaks."""
    lines = [f"source: {report['source']}  ({report['channels']}x{report['image_size'][0]}x"
             f"{report['image_size'][1]}, fingerprint {report['fingerprint'][:12]})", ""]
    lines += _count_table(report["counts"], report["class_names"]) + [""]
    lines.append(f"rejected files: {len(report['rejected'])}")
    lines += [f"  {r.get('id', r['path'])}: {r['reason']}" for r in report["rejected"][:max_items]]
    lines += _more(report["rejected"], max_items)
    lines.append(f"ignored (hidden / not images): {report['ignored']}")
    for kind, per_split in report["duplicates"].items():
        for s, groups in per_split.items():
            lines.append(f"duplicate {kind} within {s}: {len(groups)} groups")
            lines += [f"  {', '.join(g)}" for g in groups[:max_items]] + _more(groups, max_items)
    for kind, groups in report["leaks"].items():
        lines.append(f"LEAKAGE ({kind} identical across splits): {len(groups)} groups"
                     if groups else f"no {kind} duplicates across splits")
        lines += ["  " + "; ".join(f"{s}: {', '.join(ids)}" for s, ids in g.items())
                  for g in groups[:max_items]] + _more(groups, max_items)
    return "\n".join(lines)


def _count_table(counts: dict, class_names: list[str]) -> list[str]:
    splits = list(counts)
    width = max([len("class"), len("total")] + [len(c) for c in class_names])
    row = lambda name, vals: f"{name:<{width}}" + "".join(f"{v:>9}" for v in vals)  # noqa: E731
    lines = [row("class", splits + ["all"])]
    lines += [row(c, [counts[s][c] for s in splits] + [sum(counts[s][c] for s in splits)])
              for c in class_names]
    totals = [sum(counts[s].values()) for s in splits]
    return lines + [row("total", totals + [sum(totals)])]


def _more(items: list, shown: int) -> list[str]:
    return [f"  ... and {len(items) - shown} more"] if len(items) > shown else []

"""ImageFolder trees: root/<class>/* or root/{train,val,test}/<class>/* -> parts dict.

Two passes over the files, both on a thread pool (PIL releases the GIL while decoding):
1. header probe (size after EXIF rotation, grayscale?) to pick the default size and channels
   without holding full-size pixels in memory;
2. decode + resize straight into the final uint8 (N, C, H, W) array, hashing each file's bytes.
Unreadable files are listed in "rejected" with the reason; hidden entries and non-image
extensions are skipped and counted in "ignored" (a hidden folder counts once).
Only regular files are ever opened: FIFOs, sockets, devices, dangling symlinks, symlink loops
and symlinked sub-folders (not followed) are listed in "rejected" with the reason, unopened.
Names in "rejected" are printable strings (display_name), whatever bytes the file system holds.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .cache import settings_hash, sha256_file
from .images import IMAGE_EXTENSIONS, ImageError, decode_image, probe_image, resize_image, verify_image
from .limits import DataLimits
from .paths import display_name, not_regular_reason
from ..progress import track

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------- listing

def list_tree(root: Path) -> dict:
    """{"layout", "items": [(split, class, path)], "class_dirs": [(split, class, dir)], "ignored"}."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    top, ignored = _visible_dirs(root)
    groups = _split_groups(root, top)
    items, class_dirs, skipped = [], [], []
    for split, sdir in groups:
        cdirs, n = (top, 0) if sdir == root else _visible_dirs(sdir)
        ignored += n
        for cdir in cdirs:
            files, n, skip = _image_files(cdir)
            ignored += n
            class_dirs.append((split, cdir.name, cdir))
            items += [(split, cdir.name, f) for f in files]
            skipped += [(split, cdir.name, f, reason) for f, reason in skip]
    if not class_dirs:
        raise ValueError(f"{root}: no class folders; expected root/<class>/<image> "
                         "or root/{train,val,test}/<class>/<image>")
    return {"root": root, "layout": "splits" if groups[0][1] != root else "flat",
            "items": items, "class_dirs": class_dirs, "ignored": ignored, "skipped": skipped}


def _split_groups(root: Path, top: list[Path]) -> list[tuple[str, Path]]:
    split_dirs = [d for d in top if d.name.lower() in SPLIT_DIRS]
    if not split_dirs:
        return [("train", root)]
    others = [d.name for d in top if d not in split_dirs]
    if others:
        raise ValueError(f"{root}: mixes split folders ({', '.join(d.name for d in split_dirs)}) "
                         f"with other folders ({', '.join(others)}); use either root/<class>/ "
                         "or root/{train,val,test}/<class>/")
    splits = [SPLIT_DIRS[d.name.lower()] for d in split_dirs]
    dup = [s for s, n in Counter(splits).items() if n > 1]
    if dup:
        raise ValueError(f"{root}: several folders map to the '{dup[0]}' split "
                         f"({', '.join(d.name for d in split_dirs)}); keep one")
    return list(zip(splits, split_dirs))


def _visible_dirs(folder: Path) -> tuple[list[Path], int]:
    """Non-hidden sub-folders (sorted) and how many other entries were ignored."""
    dirs, ignored = [], 0
    for p in sorted(folder.iterdir()):
        if not p.name.startswith(".") and p.is_dir():
            dirs.append(p)
        else:
            ignored += 1
    return dirs, ignored


def _image_files(cdir: Path) -> tuple[list[Path], int, list[tuple[Path, str]]]:
    """Regular image files under a class folder (recursive, sorted), the ignored count, and
    the (path, reason) of image-named entries that are not regular files (never opened)."""
    files, ignored, skipped = [], 0, []
    for dirpath, dirnames, filenames in os.walk(cdir):  # followlinks=False: no symlink cycles
        hidden = [d for d in dirnames if d.startswith(".")]
        ignored += len(hidden)
        visible = sorted(d for d in dirnames if not d.startswith("."))
        links = [d for d in visible if os.path.islink(os.path.join(dirpath, d))]
        skipped += [(Path(dirpath) / d, "symlink to a folder: not followed (could loop); "
                     "link the files or copy the folder instead") for d in links]
        dirnames[:] = [d for d in visible if d not in links]
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            path = Path(dirpath) / name
            reason = not_regular_reason(path)
            if reason is None:
                files.append(path)
            else:
                skipped.append((path, f"{reason}: skipped, never opened"))
    return files, ignored, skipped


def listing_key(listing: dict, settings: dict) -> str:
    """Cheap identity of the tree (paths, sizes, mtimes) + requested settings, for memo lookup."""
    stats = [(_rel(listing, p), *_stat(p)) for _, _, p in listing["items"]]
    skipped = [(_rel(listing, p), reason) for _, _, p, reason in listing["skipped"]]
    return settings_hash("folder-listing", str(listing["root"].resolve()), stats, skipped, settings)


def _stat(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
    except OSError:  # removed since the listing: the decode step rejects it with its reason
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _rel(listing: dict, p: Path) -> str:
    return p.relative_to(listing["root"]).as_posix()


# ---------------------------------------------------------------- probing

def _probe_all(listing, pool, check=probe_image, keep_errors=False,
               desc="reading image headers") -> tuple[list, list[dict]]:
    """Per item: ((H, W), gray) or None; rejected entries for the None ones.
    check: probe_image (header only) or verify_image (header + full decode, nothing kept);
    keep_errors: the ImageError itself instead of None."""
    def probe(item):
        try:
            return check(item[2])
        except ImageError as e:
            return e
    results = list(track(pool.map(probe, listing["items"]), desc, total=len(listing["items"])))
    if keep_errors:
        return results, []
    rejected = [_reject(listing, item, r.reason) for item, r in zip(listing["items"], results)
                if isinstance(r, ImageError)]
    return [None if isinstance(r, ImageError) else r for r in results], rejected


def _reject(listing, item, reason: str) -> dict:
    return {"path": display_name(item[2]), "id": display_name(_rel(listing, item[2])),
            "reason": display_name(reason)}


def _skipped_rejects(listing) -> list[dict]:
    return [_reject(listing, (s, c, p), reason) for s, c, p, reason in listing["skipped"]]


def _choose_settings(probes, settings: dict, root, limits: DataLimits) -> tuple[int, tuple[int, int]]:
    """Requested channels/size, else 1 channel only if every image is grayscale, most common size."""
    good = [p for p in probes if p is not None]
    if not good:
        raise ValueError(f"{root}: no readable images found (every candidate file was rejected)")
    channels = settings["channels"] or (1 if all(gray for _, gray in good) else 3)
    if settings["image_size"]:
        return channels, tuple(settings["image_size"])
    sizes = Counter(size for size, _ in good)
    size = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]
    limits.check_side(size, f"{root}: the most common image size (the default data.image_size)")
    return channels, size


# ---------------------------------------------------------------- decoding

def decode_tree(listing: dict, settings: dict, workers: int | None = None,
                limits: DataLimits | None = None) -> dict:
    """Decode every image -> parts dict (+ "fingerprint" over paths, sizes, content hashes)."""
    limits = limits or DataLimits.from_env()
    _check_class_count(listing, limits)
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        probes, rejected = _probe_all(listing, pool)
        channels, size = _choose_settings(probes, settings, listing["root"], limits)
        ok = [it for it, p in zip(listing["items"], probes) if p is not None]
        limits.check_bytes(len(ok) * channels * size[0] * size[1],
                           f"{listing['root']}: {len(ok)} images at {channels}x{size[0]}x{size[1]}")
        out = np.empty((len(ok), channels, *size), np.uint8)       # (N, C, H, W)
        results = list(track(pool.map(lambda j: _decode_into(out, j, ok[j][2], channels, size,
                                                             settings["resize"]), range(len(ok))),
                             "decoding images", total=len(ok)))
    rejected = _skipped_rejects(listing) + rejected
    digests = {str(p): _file_digest(p)  # probe-rejected files still count in the fingerprint
               for (_, _, p), pr in zip(listing["items"], probes) if pr is None}
    good = []
    for j, (digest, err) in enumerate(results):
        digests[str(ok[j][2])] = digest
        if err is None:
            good.append(j)
        else:
            rejected.append(_reject(listing, ok[j], err))
    out = _compact(out, good)
    kept = [ok[j] for j in good]
    _check_class_dirs(listing, kept, rejected)
    parts = _parts(listing, kept, out, channels, size, rejected, settings)
    entries = [(_rel(listing, p), _stat(p)[0], digests[str(p)]) for _, _, p in listing["items"]]
    parts["fingerprint"] = settings_hash("folder", entries, settings, channels, list(size))
    # what sources.py needs to derive a smaller size from this entry with the same fingerprint
    parts["derive"] = {"entries": entries, "resized": any(tuple(p[0]) != tuple(size) for p in probes if p)}
    return parts


def _check_class_count(listing, limits: DataLimits) -> None:
    """Before any file is read: one class per folder name, bounded like any other source."""
    limits.check_classes(len({c for _, c, _ in listing["class_dirs"]}),
                         f"{listing['root']} (one class per folder)")


def _file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (a huge rejected file is not held in memory)."""
    try:
        return sha256_file(path)
    except OSError as e:  # vanished or unreadable since the listing: part of the fingerprint anyway
        return f"unreadable: {e.strerror}"


def _decode_into(out, j, path: Path, channels, size, resize) -> tuple[str, str | None]:
    """Decode one file into out[j]; returns (sha256 of the bytes, error reason or None).
    The hash is read in chunks and PIL reads what it decodes, so a huge file with a valid
    header and gigabytes of trailing junk is never held in memory."""
    try:
        digest = sha256_file(path)
    except OSError as e:
        return "", f"cannot read file ({e})"
    try:
        arr = resize_image(decode_image(path, channels), size, resize)  # (H, W, C)
    except ImageError as e:
        return digest, e.reason
    out[j] = arr.transpose(2, 0, 1)
    return digest, None


def _compact(out: np.ndarray, good: list[int]) -> np.ndarray:
    """Move the good rows to the front in place (no second full-size copy)."""
    for new, old in enumerate(good):
        if new != old:
            out[new] = out[old]
    return out[:len(good)]


def _check_class_dirs(listing, kept, rejected) -> None:
    valid = Counter((s, c) for s, c, _ in kept)
    for split, cls, cdir in listing["class_dirs"]:
        if valid[(split, cls)] == 0:
            rel = cdir.relative_to(listing["root"]).as_posix()
            bad = [r for r in rejected if r["id"].startswith(display_name(rel) + "/")]
            detail = f"{len(bad)} rejected, e.g. {bad[0]['id']}: {bad[0]['reason']}" if bad \
                else "no image files"
            raise ValueError(f"{listing['root']}: class folder '{display_name(rel)}' has no valid images "
                             f"({detail}); add images or remove the folder")


def _parts(listing, kept, images, channels, size, rejected, settings) -> dict:
    names = sorted({c for _, c, _ in listing["class_dirs"]})
    index = {c: i for i, c in enumerate(names)}
    splits = {}
    for split in ("train", "val", "test"):
        rows = [j for j, (s, _, _) in enumerate(kept) if s == split]
        if not rows and split not in {s for s, _, _ in listing["class_dirs"]}:
            continue
        splits[split] = {
            "images": None if images is None else images[rows] if len(rows) != len(kept) else images,
            "labels": np.array([index[kept[j][1]] for j in rows], np.int64),
            "ids": [_rel(listing, kept[j][2]) for j in rows],
            "files": [str(kept[j][2]) for j in rows]}
    return {"name": listing["root"].resolve().name, "class_names": [display_name(c) for c in names],
            "splits": splits,
            "channels": channels, "image_size": tuple(size), "rejected": rejected,
            "extra": {"ignored": listing["ignored"], "layout": listing["layout"],
                      "resize": settings["resize"], "root": str(listing["root"])}}


# ---------------------------------------------------------------- streaming

def stream_tree(listing: dict, settings: dict, workers: int | None = None,
                limits: DataLimits | None = None, checked: list | None = None) -> dict:
    """Like decode_tree but keeps file lists only; images are read later (stream.py).

    Every file is decoded once here and its pixels dropped (verify_image: JPEGs at 1/8 scale):
    a truncated or corrupt file is rejected now, with its reason in "rejected" and so in the
    report, instead of killing a DataLoader worker mid-training. The fingerprint is over paths,
    sizes and mtimes (no content hash). A file that changes after this check still raises
    ImageError naming it when it is read.
    checked: a memo of an earlier check of this exact listing (parts["checked"], JSON-able),
    used instead of decoding again.
    """
    limits = limits or DataLimits.from_env()
    _check_class_count(listing, limits)
    probes = _from_checked(checked, len(listing["items"]))
    if probes is None:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            results, _ = _probe_all(listing, pool, check=verify_image, keep_errors=True,
                                    desc="checking images (full decode)")
        checked = [{"reason": r.reason} if isinstance(r, ImageError) else [*r[0], r[1]] for r in results]
        probes = _from_checked(checked, len(listing["items"]))
    rejected = _skipped_rejects(listing) + [_reject(listing, item, c["reason"]) for item, c in
                                            zip(listing["items"], checked) if isinstance(c, dict)]
    channels, size = _choose_settings(probes, settings, listing["root"], limits)
    items = [it for it, p in zip(listing["items"], probes) if p is not None]
    _check_class_dirs(listing, items, rejected)
    parts = _parts(listing, items, None, channels, size, rejected, settings)
    parts["extra"]["fingerprint_kind"] = "metadata"
    stats = [(_rel(listing, p), *_stat(p)) for _, _, p in listing["items"]]
    parts["fingerprint"] = settings_hash("folder-stream", stats, settings, channels, list(size))
    parts["checked"] = checked
    return parts


def _from_checked(checked, n: int) -> list | None:
    """Memo entries ([H, W, gray] or {"reason"}) -> probes; None if absent or malformed."""
    if not isinstance(checked, list) or len(checked) != n:
        return None
    try:
        return [None if isinstance(c, dict) and isinstance(c["reason"], str)
                else ((int(c[0]), int(c[1])), bool(c[2])) for c in checked]
    except (TypeError, KeyError, IndexError, ValueError):
        return None

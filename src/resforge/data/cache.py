"""On-disk cache of decoded datasets, keyed by the source fingerprint.

Layout under cache_dir:
    <fingerprint>/meta.json            class names, channels, size, per-split shape/ids/files, rejected
    <fingerprint>/<split>.u8           raw uint8 (N, C, H, W), read back as np.memmap(mode="r")
    <fingerprint>/<split>.labels.npy   int64 (N,)
    <fingerprint>/last_use.json        {"last_use": unix time} of the latest read (for `resforge cache`)
    memo/<key>.json                    small memos: file hashes by (path, size, mtime), folder listings
An entry is written into a temporary sibling folder and renamed into place, so a reader sees
either no entry or a complete one (a crashed writer leaves only a ".tmp-*" folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..progress import track

CACHE_FORMAT = 1
LAST_USE_FILE = "last_use.json"


def default_cache_dir() -> Path:
    env = os.environ.get("RESFORGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "resforge" / "cache"


def resolve_cache_dir(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def read_entry(cache_dir, fingerprint: str) -> dict | None:
    """{"meta": dict, "arrays": {split: (images memmap, labels)}} or None if absent."""
    entry = resolve_cache_dir(cache_dir) / fingerprint
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("cache_format") != CACHE_FORMAT:
            return None
        arrays = {name: (_open_images(entry / f"{name}.u8", tuple(s["shape"])),
                         np.load(entry / f"{name}.labels.npy", allow_pickle=False))
                  for name, s in meta["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt data cache entry {entry} ({e}); delete that folder and load "
                         "again") from None
    _record_use(entry)
    return {"meta": meta, "arrays": arrays}


def _record_use(entry: Path) -> None:
    """Best effort (a read-only cache is still usable): `resforge cache clear --older-than` reads it."""
    try:
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".use-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"last_use": time.time()}, f)
        os.replace(tmp, entry / LAST_USE_FILE)
    except OSError:
        pass


def _open_images(path: Path, shape: tuple) -> np.ndarray:
    if 0 in shape:  # mmap cannot map an empty file
        return np.zeros(shape, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)


def write_entry(cache_dir, fingerprint: str, meta: dict, arrays: dict) -> Path:
    """Store arrays {split: (uint8 (N,C,H,W), int64 (N,))} + meta atomically; returns the entry dir.

    meta["splits"][split] must exist for each split (ids, files, ...); shapes are added here.
    """
    root = resolve_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / fingerprint
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fingerprint[:16]}-", dir=root))
    try:
        meta = {**meta, "cache_format": CACHE_FORMAT, "splits": dict(meta["splits"])}
        for name, (images, labels) in track(arrays.items(), "writing the decoded-image cache",
                                            total=len(arrays), unit="split"):
            np.ascontiguousarray(images, dtype=np.uint8).tofile(tmp / f"{name}.u8")
            np.save(tmp / f"{name}.labels.npy", np.asarray(labels, dtype=np.int64))
            meta["splits"][name] = {**meta["splits"][name], "shape": list(images.shape)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        _remove_stale(final)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():  # someone else's identical entry is fine
            raise
    return final


def _remove_stale(entry: Path) -> None:
    """Drop an entry written by another cache format (read_entry ignores it)."""
    try:
        stale = json.loads((entry / "meta.json").read_text()).get("cache_format") != CACHE_FORMAT
    except (OSError, ValueError):
        stale = False
    if stale:
        shutil.rmtree(entry, ignore_errors=True)


def memo_get(cache_dir, key: str) -> dict | None:
    path = resolve_cache_dir(cache_dir) / "memo" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def memo_put(cache_dir, key: str, value: dict) -> None:
    """Best effort: a memo that cannot be written only costs recomputation later."""
    folder = resolve_cache_dir(cache_dir) / "memo"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        pass


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path, cache_dir) -> str:
    """Content hash of a (large) file, memoised by (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"file|{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    hit = memo_get(cache_dir, key)
    if hit and "sha256" in hit:
        return hit["sha256"]
    digest = sha256_file(path)
    memo_put(cache_dir, key, {"path": str(path), "sha256": digest})
    return digest


def settings_hash(*parts) -> str:
    """sha256 of the canonical JSON of parts: combine content hashes with decode settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

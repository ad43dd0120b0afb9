"""CIFAR-10 / CIFAR-100: find, download (URL + MD5) and read the official layouts.

Binary layout: each record is label byte(s) + 3072 pixel bytes (1024 R, 1024 G, 1024 B, row-major
32x32). CIFAR-10 has 1 label byte; CIFAR-100 has coarse then fine (we use fine, 100 classes).
Python layout: py2 pickles of {data: uint8 (N, 3072), labels | fine_labels: [int]}, read through
safe_pickle. Archives are read member by member from the tar stream, never extracted to disk.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import os
import pickle
import re
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from .safe_pickle import UnsafePickleError, safe_load_pickle

BASE_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR_FILES = {  # variant -> (official archive name, MD5)
    "cifar-10-binary": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
    "cifar-10-python": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar-100-binary": ("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8"),
    "cifar-100-python": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_NAMES = {  # dataset -> (extracted folder names, archive variants), preference order
    "cifar10": (("cifar-10-batches-bin", "cifar-10-batches-py"), ("cifar-10-binary", "cifar-10-python")),
    "cifar100": (("cifar-100-binary", "cifar-100-python"), ("cifar-100-binary", "cifar-100-python")),
}
_MEMBER = re.compile(r"^(data_batch_[1-5]|test_batch|batches\.meta|train|test|meta)(\.bin|\.txt)?$"
                     r"|^fine_label_names\.txt$")
_PIXELS = 3 * 32 * 32
_MAX_MEMBER = 256 * 2**20
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


def default_data_root() -> Path:
    env = os.environ.get("RESFORGE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "resforge" / "data"


def candidate_paths(name: str, data_root) -> list[Path]:
    """Where load_source looks for `name` ("cifar10"/"cifar100"): folders first (no decompression)."""
    folders, variants = CIFAR_NAMES[name]
    root = Path(data_root)
    archives = [CIFAR_FILES[v][0] for v in variants]
    archives += [a.replace(".tar.gz", ".tar.xz") for a in archives]
    return [root / f for f in folders] + [root / a for a in archives]


def find_cifar(name: str, data_root) -> Path | None:
    return next((p for p in candidate_paths(name, data_root) if p.exists()), None)


def looks_like_cifar(path: Path) -> bool:
    """A tar archive (checked by read_cifar) or a folder holding CIFAR batch files."""
    if path.is_dir():
        return any((path / f).is_file() for f in ("data_batch_1.bin", "data_batch_1", "train.bin")) \
            or all((path / f).is_file() for f in ("train", "test", "meta"))  # cifar-100-python
    return path.name.lower().endswith(TAR_SUFFIXES)


def not_found_message(name: str, data_root) -> str:
    looked = "\n  ".join(str(p) for p in candidate_paths(name, data_root))
    archive = CIFAR_FILES[CIFAR_NAMES[name][1][0]][0]
    root = Path(data_root)
    where = f"{root}" if root.is_absolute() else f"{root} (= {root.resolve()}, relative to {Path.cwd()})"
    missing = "" if root.is_dir() else f"\nThe folder {where} does not exist."
    return (f"{name} not found; looked for:\n  {looked}{missing}\n"
            f"Fix: pass --download (download=True) to fetch {BASE_URL}{archive}, or put {archive} "
            f"(or an extracted folder) in {where} (set RESFORGE_DATA to use another folder).")


# ---------------------------------------------------------------- download

def download_cifar(variant: str, data_root, *, url: str | None = None, md5: str | None = None,
                   progress: bool = True) -> Path:
    """Fetch an official archive into data_root, verifying its MD5; returns its path."""
    if variant not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR variant {variant!r}; choose from {sorted(CIFAR_FILES)}")
    filename, official_md5 = CIFAR_FILES[variant]
    dest = Path(data_root) / filename
    return download_file(url or BASE_URL + filename, dest, md5 or official_md5, progress=progress)


def download_file(url: str, dest: Path, md5: str, *, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """Stream url to dest.part-<pid>, check MD5, then rename: dest is complete or absent."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B",
                unit_scale=True, desc=dest.name, disable=None if progress else True) as bar:
            while block := r.read(1 << 20):
                f.write(block)
                digest.update(block)
                bar.update(len(block))
        if digest.hexdigest() != md5:
            raise ValueError(f"MD5 mismatch for {url}: expected {md5}, got {digest.hexdigest()}; "
                             f"the download is corrupt or the server's file changed. Nothing was "
                             f"written to {dest}; retry, or download it by hand and check the MD5.")
        os.replace(tmp, dest)
    except OSError as e:  # URLError / HTTPError / timeouts are OSErrors
        raise OSError(f"download of {url} failed ({e}); check the connection, or download it by "
                      f"hand and put it at {dest}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- reading

def read_cifar(path: Path) -> dict:
    """Archive or extracted folder (binary or python, CIFAR-10 or -100) -> parts dict."""
    blobs = dict(_members(Path(path)))
    if "data_batch_1.bin" in blobs:
        return _binary(blobs, path, "cifar10", [f"data_batch_{i}.bin" for i in range(1, 6)],
                       "test_batch.bin", "batches.meta.txt", label_bytes=1)
    if "train.bin" in blobs:
        return _binary(blobs, path, "cifar100", ["train.bin"], "test.bin",
                       "fine_label_names.txt", label_bytes=2)
    if "data_batch_1" in blobs:
        return _python(blobs, path, "cifar10", [f"data_batch_{i}" for i in range(1, 6)],
                       "test_batch", "batches.meta", "labels", "label_names")
    if "train" in blobs and "meta" in blobs:
        return _python(blobs, path, "cifar100", ["train"], "test", "meta",
                       "fine_labels", "fine_label_names")
    raise ValueError(f"{path}: not a CIFAR archive or folder (found {sorted(blobs) or 'no'} "
                     "CIFAR files); expected e.g. data_batch_1.bin or train.bin inside")


def _members(path: Path):
    """(basename, bytes) of the CIFAR files in a folder or a tar archive (streamed)."""
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file() and _MEMBER.match(p.name):
                _check_size(path, p.name, p.stat().st_size)
                yield p.name, p.read_bytes()
        return
    try:
        with tarfile.open(path, "r|*") as tf:  # "|": sequential stream, no seeking, no extraction
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and _MEMBER.match(base):
                    _check_size(path, m.name, m.size)
                    yield base, tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or unreadable archive ({e}); delete it and "
                         "download again") from None


def _check_size(path, member: str, size: int) -> None:
    if size > _MAX_MEMBER:  # the largest real one (cifar-100 train.bin) is 154 MB
        raise ValueError(f"{path}: {member} is {size} bytes, far more than any CIFAR file "
                         f"(limit {_MAX_MEMBER}); this is not an official CIFAR archive or folder")


def _need(blobs: dict, name: str, path) -> bytes:
    if name not in blobs:
        raise ValueError(f"{path}: missing {name}; the archive/folder is incomplete, re-download it")
    return blobs[name]


def _binary(blobs, path, name, train_files, test_file, names_file, label_bytes) -> dict:
    k = 10 if name == "cifar10" else 100
    splits = {"train": _binary_split(blobs, path, train_files, label_bytes, k),
              "test": _binary_split(blobs, path, [test_file], label_bytes, k)}
    text = blobs.get(names_file, b"").decode("utf-8", "replace")
    names = [s.strip() for s in text.splitlines() if s.strip()]
    return {"name": name, "class_names": names if len(names) == k else [str(i) for i in range(k)],
            "splits": splits}


def _binary_split(blobs, path, files, label_bytes, k) -> dict:
    record = label_bytes + _PIXELS
    images, labels, ids = [], [], []
    for f in files:
        raw = np.frombuffer(_need(blobs, f, path), np.uint8)
        if raw.size % record:
            raise ValueError(f"{path}: {f} has {raw.size} bytes, not a multiple of the {record}-byte "
                             "record; the file is truncated, re-download it")
        rec = raw.reshape(-1, record)                          # (N, label_bytes + 3072)
        labels.append(rec[:, label_bytes - 1].astype(np.int64))  # last label byte = (fine) label
        images.append(rec[:, label_bytes:].reshape(-1, 3, 32, 32))
        ids += [f"{f}:{i}" for i in range(len(rec))]
    return _finish(images, labels, ids, k, path)


def _python(blobs, path, name, train_files, test_file, meta_file, label_key, names_key) -> dict:
    k = 10 if name == "cifar10" else 100
    splits = {"train": _python_split(blobs, path, train_files, label_key, k),
              "test": _python_split(blobs, path, [test_file], label_key, k)}
    meta = _unpickle(blobs, path, meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    return {"name": name, "class_names": names if len(names) == k else [str(i) for i in range(k)],
            "splits": splits}


def _python_split(blobs, path, files, label_key, k) -> dict:
    images, labels, ids = [], [], []
    for f in files:
        d = _unpickle(blobs, path, f)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{path}: {f} lacks 'data' or '{label_key}' (keys: {sorted(d)})")
        try:
            data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(np.asarray(d[label_key], dtype=np.int64).reshape(-1))
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"{path}: {f} does not hold CIFAR records ({e}); re-download it") from None
        images.append(data)
        ids += [f"{f}:{i}" for i in range(len(data))]
    return _finish(images, labels, ids, k, path)


def _unpickle(blobs, path, member: str):
    """A truncated or refused pickle is a sentence naming the archive and member (ValueError)."""
    try:
        d = safe_load_pickle(io.BytesIO(_need(blobs, member, path)), name=f"{path}:{member}")
    except UnsafePickleError:
        raise                            # a refusal, not damage: its message names the global
    except pickle.UnpicklingError as e:
        raise ValueError(f"{e}; the file is damaged or not an official CIFAR file: re-download it") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: {member} holds a {type(d).__name__}, not a CIFAR batch dict; "
                         "re-download it")
    return d


def _finish(images, labels, ids, k, path) -> dict:
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"{path}: labels outside 0..{k - 1} (found {labels.min()}..{labels.max()})")
    return {"images": images, "labels": labels, "ids": ids, "files": None}

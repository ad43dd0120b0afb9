"""`resforge cache list|clear`: what the decoded-tensor cache (cache.py) holds, and freeing it.

Only the cache's own entries are ever deleted: a folder directly inside the cache folder, named
by a 64-hex-digit fingerprint, holding a meta.json, not a symbolic link, and resolving inside
the cache folder. Anything else found there (a file you put there, a link) is listed as
"other" and left alone; memo/ (small JSON memos named by a hash) goes only with --all, and so
do the ".tmp-<hex>-*" folders a crashed writer left behind, once nothing in them changed for a day
(a live writer's folder is younger).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from .cache import LAST_USE_FILE, resolve_cache_dir

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TMP = re.compile(r"\.tmp-[0-9a-f]{16}-[A-Za-z0-9_]+")   # cache.write_entry's mkdtemp names
STALE_TMP_SECONDS = 86400


def _is_entry(root: Path, p: Path) -> bool:
    return (bool(_HEX64.fullmatch(p.name)) and not p.is_symlink() and p.is_dir()
            and (p / "meta.json").is_file() and p.resolve().parent == root.resolve())


def _du(p: Path) -> int:
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if not f.is_symlink() and f.is_file())


def _stale_tmp(root: Path, p: Path) -> bool:
    if not (_TMP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
            and p.resolve().parent == root.resolve()):
        return False
    newest = max([p.lstat().st_mtime] + [f.lstat().st_mtime for f in p.rglob("*")])
    return time.time() - newest > STALE_TMP_SECONDS


def _last_use(entry: Path) -> float:
    """When a load last read this entry (cache.read_entry records it), else when it was written."""
    try:
        return float(json.loads((entry / LAST_USE_FILE).read_text())["last_use"])
    except (OSError, ValueError, KeyError, TypeError):
        return (entry / "meta.json").stat().st_mtime


def list_entries(cache_dir=None) -> dict:
    """{"root", "entries": [{fingerprint, path, name, source, image_size, channels, n_images,
    bytes, last_use}], "memo_bytes", "other": [names left alone]}."""
    root = resolve_cache_dir(cache_dir)
    out = {"root": str(root), "entries": [], "memo_bytes": 0, "stale": [], "other": []}
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.name == "memo" and p.is_dir() and not p.is_symlink():
            out["memo_bytes"] = _du(p)
        elif _stale_tmp(root, p):
            out["stale"].append({"path": str(p), "bytes": _du(p)})
        elif _is_entry(root, p):
            try:
                meta = json.loads((p / "meta.json").read_text())
                splits = meta.get("splits", {})
                extra = meta.get("extra") or {}
                out["entries"].append({
                    "fingerprint": p.name, "path": str(p), "name": str(meta.get("name", "?")),
                    "source": str(extra.get("root") or extra.get("path") or meta.get("name", "?")),
                    "image_size": list(meta.get("image_size") or []), "channels": meta.get("channels"),
                    "n_images": sum(int(s.get("shape", [0])[0]) for s in splits.values()),
                    "bytes": _du(p), "last_use": _last_use(p)})
            except (OSError, ValueError, TypeError, AttributeError, IndexError):
                out["other"].append(p.name)  # unreadable meta: not provably ours, so never deleted
        else:
            out["other"].append(p.name)
    return out


def select(listing: dict, older_than_days: float | None = None, source: str | None = None,
           everything: bool = False) -> list[dict]:
    """The entries a clear would remove: all with `everything`, else those matching every filter given."""
    if everything:
        return list(listing["entries"])
    if older_than_days is None and source is None:
        raise ValueError("cache clear needs --older-than DAYS, --source NAME or --all (nothing was removed)")
    cutoff = time.time() - 86400 * older_than_days if older_than_days is not None else None
    picked = []
    for e in listing["entries"]:
        if cutoff is not None and e["last_use"] >= cutoff:
            continue
        if source is not None and source not in (e["name"], e["source"]) \
                and str(Path(source).expanduser().resolve()) != e["source"]:
            continue
        picked.append(e)
    return picked


def clear(cache_dir=None, older_than_days: float | None = None, source: str | None = None,
          everything: bool = False, dry_run: bool = False) -> tuple[list[dict], int]:
    """Remove the selected entries (and, with everything, the memos); returns (entries, bytes freed)."""
    root = resolve_cache_dir(cache_dir)
    listing = list_entries(root)
    picked = select(listing, older_than_days, source, everything)
    leftovers = listing["stale"] if everything else []
    freed = sum(e["bytes"] for e in picked + leftovers) + (listing["memo_bytes"] if everything else 0)
    if dry_run:
        return picked, freed
    for e in picked:
        path = Path(e["path"])
        if _is_entry(root, path):  # checked again right before deleting
            shutil.rmtree(path)
    for t in leftovers:
        if _stale_tmp(root, Path(t["path"])):
            shutil.rmtree(t["path"])
    memo = root / "memo"
    if everything and memo.is_dir() and not memo.is_symlink():
        for f in memo.iterdir():
            if f.suffix == ".json" and _HEX64.fullmatch(f.stem) and f.is_file() and not f.is_symlink():
                f.unlink()
    return picked, freed


# ---------------------------------------------------------------- text for the CLI

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return (f"{s / 86400:.1f} days ago" if s >= 86400 else f"{s / 3600:.1f} h ago" if s >= 3600
            else f"{s / 60:.0f} min ago")


def format_listing(listing: dict) -> str:
    entries = listing["entries"]
    lines = [f"data cache: {listing['root']} (set RESFORGE_CACHE to move it)"]
    if entries:
        rows = [("entry", "source", "size", "C", "images", "on disk", "last use")]
        rows += [(e["fingerprint"][:12], e["source"], "x".join(map(str, e["image_size"])) or "?",
                  str(e["channels"]), str(e["n_images"]), human_bytes(e["bytes"]), _ago(e["last_use"]))
                 for e in sorted(entries, key=lambda e: -e["last_use"])]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total = sum(e["bytes"] for e in entries)
    stale = listing["stale"]
    lines.append(f"{len(entries)} entries, {human_bytes(total)}; memos {human_bytes(listing['memo_bytes'])}"
                 + (f"; {len(stale)} unfinished writes older than a day, "
                    f"{human_bytes(sum(t['bytes'] for t in stale))} (clear --all removes them)" if stale else "")
                 + (f"; left alone (not cache entries): {', '.join(listing['other'])}" if listing["other"] else ""))
    return "\n".join(lines)


def format_cleared(picked: list[dict], freed: int, dry_run: bool, root) -> str:
    verb = "would free" if dry_run else "freed"
    return f"{verb} {human_bytes(freed)}: {len(picked)} entries in {root}" + \
        (" (dry run: nothing removed)" if dry_run else "")

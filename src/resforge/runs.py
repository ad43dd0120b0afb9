"""Run folders: runs/<name>/ created fresh (never overwritten), metrics.csv, the resolved config,
and what a resume reads back (open_for_resume) after sweeping a killed session's temporaries.

Only the main process (rank 0) writes; every function here is a no-op elsewhere, so the
loop can run under DistributedDataParallel unchanged.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import torch.distributed as dist

from resforge.checkpoint import atomic_write_text, load_state
from resforge.config import load_config
from resforge.data.splits import load_manifest


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def say(msg: str) -> None:
    """Print a progress line, once per job (on the main process of a distributed run)."""
    if is_main_process():
        print(msg, flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def new_run_dir(project: str | Path, name: str) -> Path:
    """project/name, or project/name-2, -3, ... if taken: earlier runs are never overwritten."""
    project = Path(project)
    base = _slug(name)
    for i in range(1, 10_000):
        path = project / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {project} for {base}")


def default_run_name(model: str, source: str) -> str:
    return f"{model}-{Path(str(source)).stem or source}"


class RunFolderError(ValueError):
    """A run folder that cannot be resumed; the message names the file and what to do."""


# Temporaries that resforge's writers create next to their target and rename over it; a SIGKILL
# skips their cleanup. Every writer now goes through resforge.atomic: ".<name>.<8 mkstemp chars>.tmp";
# runs written by earlier versions may also hold ".<name>.<pid>.tmp" and "tmp<8 chars>.tmp".
_TEMPORARY = re.compile(r"\.[^/]+\.([a-z0-9_]{8}|[0-9]+)\.tmp|tmp[a-z0-9_]{8}\.tmp")


def sweep_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed session left in a run folder and its weights/;
    only regular files named like resforge's temporaries, nothing else. -> the files deleted.
    Call it only while no other process writes to the folder (a resume is the only writer)."""
    gone = []
    for folder in (Path(run_dir), Path(run_dir) / "weights"):
        if not folder.is_dir() or not is_main_process():
            continue
        for p in folder.iterdir():
            if _TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def open_for_resume(run_dir: str | Path) -> tuple[dict, dict | None, dict | None]:
    """(saved config, split manifest, resume state) of an interrupted run, after sweeping its
    stale temporaries. The state is None when the run was killed before its first epoch was
    saved (it restarts); so is the manifest if splits.json was never written either (it is
    made again from the saved config). Anything unusable: one RunFolderError sentence."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume {run_dir}: no such folder; pass the folder of an earlier "
                                "`resforge train` run (e.g. runs/resnet20-digits)")
    sweep_temporaries(run_dir)
    saved = _saved_config(run_dir / "config.json")
    state_path, splits = run_dir / "weights" / "last.state.pt", run_dir / "splits.json"
    if not splits.is_file():
        if state_path.is_file():
            raise RunFolderError(f"{splits} is missing, so the splits the run trained on are unknown: "
                                 f"{run_dir} cannot be resumed; restore the file or start a new run")
        return saved, None, None
    try:
        manifest = load_manifest(splits)
    except ValueError as e:
        raise RunFolderError(f"{e}: {run_dir} cannot be resumed; restore the file or start a new run") from None
    return saved, manifest, (load_state(state_path) if state_path.is_file() else None)


def _saved_config(path: Path) -> dict:
    if not path.is_file():
        raise RunFolderError(f"cannot resume {path.parent}: it has no config.json, so it is not a resforge run "
                             "folder (or its run was killed before it started); pass the folder `resforge train` "
                             "printed, or start a new run without --resume")
    try:
        saved = json.loads(path.read_text())
        load_config(None, None, base=saved)              # a saved config that no longer resolves
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise RunFolderError(f"{path} is unreadable or not a resforge config ({e}): the run cannot be resumed; "
                             "restore the file or start a new run") from None
    return saved


class MetricsLog:
    """Append-only metrics.csv, one row per epoch; a resumed run first drops rows beyond the
    epoch it resumes from, so the file ends up as if the run had never been interrupted."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, last_epoch: int) -> None:
        rows = self.rows()
        keep = [r for r in rows if int(r["epoch"]) <= last_epoch]
        if len(keep) < len(rows):                # a fresh run writes no empty file
            self._write(keep)

    def append(self, row: dict) -> None:
        rows = self.rows() + [{k: _fmt(v) for k, v in row.items()}]
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        if not is_main_process():
            return
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v

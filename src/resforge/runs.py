"""Run folders: runs/<name>/ created fresh (never overwritten), metrics.csv, the resolved config.

Only the main process (rank 0) writes; every function here is a no-op elsewhere, so the
loop can run under DistributedDataParallel unchanged.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import torch.distributed as dist

from resforge.checkpoint import atomic_write_text


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
        keep = [r for r in self.rows() if int(r["epoch"]) <= last_epoch]
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

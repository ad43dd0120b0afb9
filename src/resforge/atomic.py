"""Writing files atomically: a temporary file in the same folder, fsync, rename.

Readers see the old file or the new one, never half of one; a crash or a full disk leaves the
previous version in place. Every file resforge writes (checkpoints, sidecars, configs, manifests,
reports, metrics) goes through here, so they share one naming of temporaries (``.<name>.<8
chars>.tmp``, swept by a resume: runs.sweep_temporaries) and one mode policy (0666 less the umask).
Imports nothing heavy: data/ and report code use it as well as checkpoint.py.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# Every file resforge writes gets the mode open() would give it (0666 less the umask), not
# mkstemp's private 0600: checkpoints, configs and reports of a run share one policy.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _umask() -> int:
    """The process umask now (Linux reports it; elsewhere the one at import)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return _UMASK


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DiskFullError.ERRNOS:
            raise DiskFullError(path, len(data), e.errno) from e
        raise


class DiskFullError(OSError, ValueError):
    """No space (or quota) left to write a file; atomic_write has left its previous version in
    place and removed its temporary. A ValueError too: it is the user's to fix, and the CLI
    prints such errors as one sentence."""
    ERRNOS = (errno.ENOSPC, errno.EDQUOT)

    def __init__(self, path: Path, size: int, code: int = errno.ENOSPC):
        run = _run_folder(path)
        kept = (f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not created")
        if run is not None:          # the resume state is the run's last file of an epoch: it is still whole
            todo = (f"free space on that disk, then `resforge train --resume {run}` continues from the last "
                    "epoch saved in weights/last.state.pt (or start again on another disk with train.project=DIR)")
        else:
            todo = "free space on that disk or write to a folder on another disk"
        super().__init__(f"no space left on the device to write {path} ({size / 1e6:.1f} MB): {kept} and no "
                         f"half-written file is left; {todo}")
        self.errno, self.path = code, path          # (not .filename: str() would become "[Errno 28] ...")


def _run_folder(path: Path) -> Path | None:
    """The training run folder that `path` (metrics.csv, weights/...) belongs to, if it can resume."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.json").is_file() and (folder / "weights" / "last.state.pt").is_file():
            return folder
    return None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def temporary_for(path: Path) -> Path:
    """A fresh, unused temporary path beside `path` for writers that need a file name (matplotlib,
    exporters); the caller renames it over `path` with finish_temporary, or deletes it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
    os.close(fd)
    return Path(tmp)


def finish_temporary(tmp: Path, path: Path) -> None:
    """Give a finished temporary the shared mode policy and its final name."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


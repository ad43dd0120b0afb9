"""One process of a distributed test run (tests/test_distributed.py), started by torchrun or alone.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT key=value ...
    python tests/ddp_worker.py OUT key=value ...                     # the one-process reference

Trains the embedded digits recipe with resforge.train and records, per process, which training
images every step used: OUT/seen-<restart>-<rank>.jsonl, a line {"epoch", "idx"} per micro-batch
(idx: indices into the training split). RESFORGE_TEST_KILL="RANK:EPOCH:BATCH" makes that rank
SIGKILL itself on the first attempt (TORCHELASTIC_RESTART_COUNT=0) when it starts that batch
(0-based epoch and batch), mid-epoch and unannounced, as a crashed node would.
RESFORGE_TEST_READONLY=1: every rank but 0 fails the moment it opens, creates, renames or
deletes anything under OUT (besides its own log), so a run that finishes proves only rank 0 wrote.
"""
from __future__ import annotations

import builtins
import json
import os
import signal
import sys
from pathlib import Path

import resforge
import resforge.training.loop as loop

out = Path(sys.argv[1])
overrides = sys.argv[2:]
rank = int(os.environ.get("RANK", 0))
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
kill = os.environ.get("RESFORGE_TEST_KILL")
log = (out / f"seen-{attempt}-{rank}.jsonl").open("a")
calls: dict[int, int] = {}
real_forward_loss = loop.forward_loss


def recording_forward_loss(model, batch, augment, rt, loss_fn, epoch, g, batch_loss=None):
    n = calls[epoch] = calls.get(epoch, -1) + 1
    if kill and attempt == 0:
        k_rank, k_epoch, k_batch = map(int, kill.split(":"))
        if (rank, epoch, n) == (k_rank, k_epoch, k_batch):
            log.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    log.write(json.dumps({"epoch": epoch, "idx": batch[2].tolist()}) + "\n")
    log.flush()
    return real_forward_loss(model, batch, augment, rt, loss_fn, epoch, g, batch_loss)


loop.forward_loss = recording_forward_loss


def forbid_writes_under(root: Path) -> None:
    """Rank > 0 must not write: any write-mode open, os.open with write flags, rename, mkdir or
    unlink of a path under `root` raises (the run then fails, and the test with it)."""
    root = str(root.resolve())

    def check(path, what):
        if str(Path(os.fspath(path)).resolve()).startswith(root):
            raise PermissionError(f"rank {rank} tried to {what} {path}: only rank 0 writes")

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+"):
            check(file, f"open({mode!r})")
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check(path, "os.open for writing")
        return real_os_open(path, flags, *a, **k)

    builtins.open, os.open = open_, os_open
    for name in ("replace", "rename", "mkdir", "makedirs", "unlink", "remove", "rmdir"):
        real = getattr(os, name)
        setattr(os, name, lambda path, *a, _real=real, _name=name, **k: (check(path, _name), _real(path, *a, **k))[1])
    import safetensors.torch as st
    real_save = st.save_file
    st.save_file = lambda tensors, filename, *a, **k: (check(filename, "save_file"), real_save(tensors, filename, *a, **k))[1]


if rank > 0 and os.environ.get("RESFORGE_TEST_READONLY") == "1":
    forbid_writes_under(out)
resforge.train("digits", ["train.progress=false", *overrides])

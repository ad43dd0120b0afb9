"""One process of a distributed test run (tests/test_distributed.py), started by torchrun or alone.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT key=value ...
    python tests/ddp_worker.py OUT key=value ...                     # the one-process reference

Trains the embedded digits recipe with resforge.train and records, per process, which training
images every step used: OUT/seen-<restart>-<rank>.jsonl, a line {"epoch", "idx"} per micro-batch
(idx: indices into the training split). RESFORGE_TEST_KILL="RANK:EPOCH:BATCH" makes that rank
SIGKILL itself on the first attempt (TORCHELASTIC_RESTART_COUNT=0) when it starts that batch
(0-based epoch and batch), mid-epoch and unannounced, as a crashed node would.
"""
from __future__ import annotations

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
resforge.train("digits", ["train.progress=false", *overrides])

"""Many processes, one training run: torch.distributed as torchrun launches it.

    torchrun --nproc_per_node=2 -m resforge train ...      # or: resforge train --nproc 2 ...

torchrun starts N copies of the command and tells each who it is through the environment
(WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT or a rendezvous endpoint);
this module turns that into a process group (NCCL between GPUs, gloo on CPUs) and owns every
collective the training loop needs, so the loop itself reads as if it ran alone:

    batches   train.batch_size is the *global* batch B: every step, the same seeded per-epoch
              permutation is drawn on every rank, global batch i is order[i*B:(i+1)*B], and rank r
              takes rows [r*B/N, (r+1)*B/N) of it (rank_share); so every training image is seen
              once per epoch across ranks and a step sees the same B images whatever N is.
              Evaluation splits are cut into N contiguous slices and the logits gathered back
              in order (gather_rows): metrics count every image once, as in one process.
    gradients DistributedDataParallel averages them (wrap); BatchNorm normalises each rank's
              share unless train.sync_bn (SyncBatchNorm: GPUs only, in PyTorch).
    decisions anything that ends a loop (time budget, epochs fitted to it) is agreed by all ranks
              (agree_any, agree_min), or the ranks would wait on each other forever; BatchNorm
              running statistics are each rank's own during an epoch and combined after it
              (settle, average_bn_statistics).
    writing   rank 0 alone writes (runs.is_main_process); the others learn the run folder from it
              (broadcast_object) and wait at a barrier while it decodes a cache (rank_zero_first).
    restarts  under `torchrun --max-restarts K` a dead rank restarts the whole group; the run folder
              of the first attempt is remembered per torchrun job (remember/recall) so the
              restarted command resumes from its last checkpoint instead of starting a new run.

`resforge train` and `resforge finetune` (and their Python functions) run distributed; every other
command refuses to run as N silent copies (refuse).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(ValueError):
    """A distributed setting that cannot work; the message says what to change."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_world_size() -> int:
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (0 on the first attempt)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def refuse(command: str) -> None:
    """A command that runs in one process only, started by torchrun as one of several: one sentence."""
    if launched():
        raise DistributedError(
            f"{command} runs in one process, but torchrun started {os.environ.get('WORLD_SIZE')} copies of it "
            "(WORLD_SIZE); run it without torchrun or --nproc (`resforge train` and `resforge finetune` run distributed)")


def setup(device: str) -> str:
    """Join the process group torchrun describes (once) and return the device string this rank
    trains on: cuda:LOCAL_RANK for a GPU run (NCCL; one process per GPU), else the CPU (gloo)."""
    gpu = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda") or device.isdigit())
    if gpu:
        local = _env_int("LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} GPUs: "
                                   "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        # torchrun's agent keeps one key-value store across restarts; without a prefix per attempt a
        # restarted rank can read the address a dead rank published before it ("Connection refused":
        # measured here on the kill-and-restart test, as pytorch/pytorch#167288 reports for NCCL).
        store, r, w = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"resforge/attempt-{restart_count()}", store)
        dist.init_process_group("nccl" if gpu else "gloo", store=store, rank=r, world_size=w)
    return device


def cpu_threads_share(cores: int) -> int:
    """CPU threads per process when several share a machine: its cores split evenly, >= 1."""
    return max(1, cores // local_world_size())


def backend() -> str | None:
    return dist.get_backend() if active() else None


def describe() -> str:
    return f"{world_size()} processes ({backend()})" if active() else "1 process"


def _coll_device(t_device: torch.device | None = None) -> torch.device:
    """Where a collective's tensors live: the GPU for NCCL, the CPU for gloo."""
    if backend() == "nccl":
        return t_device if t_device is not None and t_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- data shards

def shard_check(batch_size: int, accumulate: int = 1) -> int:
    """The images one rank takes from each global batch (= one optimiser step); the global batch
    must split evenly over the ranks and each rank's share over its accumulation steps."""
    n = world_size()
    if batch_size % n:
        lo, hi = batch_size - batch_size % n, batch_size + n - batch_size % n
        raise DistributedError(f"train.batch_size={batch_size} is the global batch and must divide by the {n} "
                               f"processes: use {lo} or {hi}")
    share = batch_size // n
    if accumulate < 1 or share % accumulate:
        raise DistributedError(f"train.accumulate={accumulate} must divide each process's {share} images a step "
                               f"(train.batch_size={batch_size} over {n} process{'es' * (n > 1)})")
    return share


def rank_share(global_batch: torch.Tensor) -> torch.Tensor:
    """Rank r's rows of one global batch of indices: [r*b, (r+1)*b) with b = len / world size."""
    n, r = world_size(), rank()
    b = len(global_batch) // n
    return global_batch[r * b:(r + 1) * b]


def eval_slice(n: int) -> tuple[int, int]:
    """This rank's contiguous rows [lo, hi) of an n-image evaluation split (slices in rank order)."""
    w, r = world_size(), rank()
    return r * n // w, (r + 1) * n // w


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (the slices of eval_slice), on every rank.
    Rows may differ in number between ranks (padded for the collective, then cut)."""
    if not active():
        return t
    dev = _coll_device(t.device)
    x = t.to(dev)
    n = torch.tensor([len(x)], device=dev)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    pad = torch.zeros((most - len(x), *x.shape[1:]), dtype=x.dtype, device=dev)
    parts = [torch.empty((most, *x.shape[1:]), dtype=x.dtype, device=dev) for _ in counts]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)]).to(t.device)


def all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """The sums over ranks of scalar tensors (one collective)."""
    if not active():
        return list(values)
    dev = values[0].device
    t = torch.stack([v.detach().to(torch.float64) for v in values]).to(_coll_device(dev))
    dist.all_reduce(t)
    return [x.to(dev) for x in t]


def _reduce_int(value: int, op) -> int:
    if not active():
        return value
    t = torch.tensor([int(value)], device=_coll_device())
    dist.all_reduce(t, op=op)
    return int(t.item())


def agree_any(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop decision must be the same everywhere)."""
    return bool(_reduce_int(flag, dist.ReduceOp.MAX))


def agree_min(value: int) -> int:
    """The smallest of the ranks' values, on every rank."""
    return _reduce_int(value, dist.ReduceOp.MIN)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable value this process made: a path, a flag)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (decoding and caching a data set), the others after it, from its
    cache: one decode for the machine, not N in parallel."""
    if rank() != 0:
        barrier()
    try:
        yield
    finally:
        if rank() == 0:
            barrier()


# ---------------------------------------------------------------- the model

def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module the training steps run through: DistributedDataParallel over `model` (which
    keeps its parameters: the optimiser, EMA and checkpoints see `model` itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if sync_bn:
        if device.type != "cuda":
            raise DistributedError("train.sync_bn=true needs GPUs: PyTorch's SyncBatchNorm does not run on CPU "
                                   "(gloo); on CPU each process normalises its own share of the batch, so leave "
                                   "train.sync_bn=false")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)        # in place: children swapped, parameters kept
    ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast before each forward: training-mode BatchNorm normalises with the batch's own
    # statistics, so the running ones only matter for evaluation; each rank keeps those of its own
    # shares and settle() combines them after the epoch (rank 0's alone would describe half the data).
    # (The keyword was renamed in torch 2.13.)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=ids, **{sync: False})


def settle(model: nn.Module) -> None:
    """One model on every rank after an epoch: BatchNorm running statistics combined over the ranks
    (average_bn_statistics), every other parameter and buffer rank 0's (DDP keeps the parameters
    equal already; this makes it certain before a rank evaluates or rank 0 saves)."""
    if not active():
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    average_bn_statistics(bns)
    skip = {id(t) for m in bns for t in (m.running_mean, m.running_var)}
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in skip:
                continue
            x = t.detach().to(_coll_device(t.device)).contiguous()    # channels_last weights: a copy
            dist.broadcast(x, src=0)
            if x.data_ptr() != t.data_ptr():
                t.copy_(x)


def average_bn_statistics(bns: list[nn.Module]) -> None:
    """BatchNorm statistics gathered on each rank's equal shard -> those of the whole split:
    mean = mean of the ranks' means; var = mean of the variances + the spread of the means around
    that mean (the law of total variance). Statistics equal on every rank (a frozen layer) come
    back bit for bit."""
    if not active():
        return
    n = world_size()
    with torch.no_grad():
        for m in bns:
            mean, var = m.running_mean, m.running_var
            dev = _coll_device(mean.device)
            mu = mean.to(dev).float().contiguous()
            dist.all_reduce(mu)
            mu /= n
            spread = torch.cat([var.to(dev).float(), (mean.to(dev).float() - mu) ** 2])
            dist.all_reduce(spread)
            spread /= n
            k = len(mean)
            mean.copy_(mu.to(mean.device))
            var.copy_((spread[:k] + spread[k:]).to(var.device))


# ---------------------------------------------------------------- elastic restarts

def _marker(project: Path) -> Path:
    # One torchrun job: its rendezvous id (unique with --standalone) and the elastic agent that
    # outlives its workers' restarts (our parent process).
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.getppid()}"
    return Path(project) / ".resforge-elastic" / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in job)}.json"


def remember(project: str | Path, run_dir: Path) -> None:
    """Rank 0, first attempt: note the run folder of this torchrun job (restarts resume it)."""
    if not launched() or rank() != 0:
        return
    from resforge.atomic import atomic_write_text
    path = _marker(Path(project))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"run_dir": str(run_dir), "argv": sys.argv[1:]}))


def recall(project: str | Path) -> Path | None:
    """After a restart: the run folder the first attempt of this torchrun job created (on every rank)."""
    if not launched() or restart_count() == 0:
        return None
    found = None
    if rank() == 0:
        try:
            found = json.loads(_marker(Path(project)).read_text())["run_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            found = None
    found = broadcast_object(found)
    return Path(found) if found and Path(found).is_dir() else None


def forget(project: str | Path) -> None:
    """Rank 0, run finished: drop the job's marker (and its folder when empty)."""
    if not launched() or rank() != 0:
        return
    path = _marker(Path(project))
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


# ---------------------------------------------------------------- launching

def launch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run `python -m resforge ARGV` as `nproc` processes on this machine through torchrun's own
    launcher (single node, a free local rendezvous port). -> exit code: 0, or 1 if a worker failed
    (torchrun has printed which one and why)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    # torchrun would set 1 thread per process (and warn); the machine's cores split evenly instead
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}",
                                         f"--max_restarts={max_restarts}", "-m", "resforge", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        failures = getattr(e, "failures", {}) or {}
        code = next((f.exitcode for f in failures.values() if getattr(f, "exitcode", None)), 1)
        return code if isinstance(code, int) and 0 < code < 128 else 1
    return 0

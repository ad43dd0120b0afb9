"""Where, in which precision and on how many CPU threads to run: chosen once, passed around explicitly."""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from resforge.distributed import refuse
from resforge.training.device_names import DEVICE_FORMS, one_device, parse_device  # noqa: F401


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype; None = plain fp32
    channels_last: bool
    threads: int = 0                # torch CPU threads (intra-op); 0 = left as it was

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        threads = f", {self.threads} CPU thread{'s' * (self.threads != 1)}" if self.threads else ""
        return f"{self.device} {self.precision} {layout}{threads}"


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512_BF16 / AMX).  Without it bf16 autocast
    is emulated and several times *slower* than fp32 (measured: 10 vs 110 img/s on an
    AVX2-only EPYC for a small conv net), so 'auto' must not pick it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_device(pref: str = "auto") -> torch.device:
    """The torch device for a device string (see parse_device); a device this machine lacks is a
    ValueError that says what to use instead."""
    name = one_device(pref)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={pref}: Apple-silicon GPUs (MPS) are not available on this machine or in this "
                         "torch build; use device=cpu or auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={pref} asks for a CUDA GPU, but this machine (or this torch build) has "
                             "none; use device=cpu or auto")
        index, count = (int(name[5:]) if ":" in name else 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device={pref}: there is no CUDA GPU {index}; this machine has {count} "
                             f"(0..{count - 1})")
    return torch.device(name)


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    try:                                       # cgroup v2: "max 100000" or "200000 100000"
        limit, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def busy_cores() -> float:
    """How many of our CPUs other work keeps busy: the 1-minute load average, where it describes
    exactly the CPUs we run on (no CPU-set or quota carving us out of a bigger host); else 0."""
    if not hasattr(os, "getloadavg") or _cgroup_quota():
        return 0.0
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) != os.cpu_count():
        return 0.0
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


_ceiling: int | None = None    # torch's thread count before resforge first changed it
_last_set: int | None = None


def choose_threads(requested: int | None = None) -> int:
    """The CPU thread count to train/evaluate with.  requested: a count, or None = RESFORGE_THREADS
    if set, else auto: the usable cores that are not already busy (1-minute load average), at
    least 1, at most what torch was set to before (OMP_NUM_THREADS, or a caller's
    torch.set_num_threads, e.g. the degradation experiment's per-job share); under
    train.deterministic (torch.use_deterministic_algorithms) auto is that ceiling, not load-dependent,
    so a rerun or a resume splits its sums the same way.  Why not one per core:
    OpenMP threads spin-wait for each other, so with a second CPU-bound process on a 2-core
    machine ResNet-20 trained at 129 img/s on 2 threads vs 297 on 1 (376/494 when idle)."""
    global _ceiling
    env = os.environ.get("RESFORGE_THREADS", "").strip()
    if requested is None and env:                    # the environment's form of --threads
        if not env.isdigit():
            raise ValueError(f"RESFORGE_THREADS={env!r}: use a count of CPU threads >= 1, or unset it (auto)")
        requested = int(env)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested}: use a count of CPU threads >= 1, or leave it unset (auto)")
        return int(requested)
    current = torch.get_num_threads()
    if _ceiling is None or current != _last_set:     # set by someone else since: that is the ceiling now
        _ceiling = current
    if torch.are_deterministic_algorithms_enabled():
        return _ceiling          # train.deterministic: a rerun must not change its reductions with the load
    free = usable_cores() - int(busy_cores() + 0.5)
    return max(1, min(_ceiling, free))


def apply_threads(requested: int | None = None) -> int:
    """choose_threads, then set it process-wide (torch's intra-op pool); returns the count."""
    global _last_set
    n = choose_threads(requested)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _last_set = n
    return n


def select_precision(device: torch.device, pref: str = "auto") -> torch.dtype | None:
    if pref == "fp32":
        return None
    if pref == "bf16":
        return torch.bfloat16
    if pref == "fp16":
        if device.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device; on CPU use bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return None                     # fp32: autocast support on MPS varies by macOS version
    return torch.bfloat16 if cpu_has_native_bf16() else None


def make_runtime(device: str = "auto", precision: str = "auto", channels_last: bool = True,
                 threads: int | None = None, distributed: bool = False) -> Runtime:
    """Every command's runtime: device (see parse_device), precision, layout and CPU threads
    (a count, or None = auto, see choose_threads), applied process-wide here. A process that
    torchrun started as one of several is refused unless the caller runs `distributed`
    (pipeline.start_runtime): a command that cannot share its work must not run as N copies."""
    if not distributed:
        refuse("this command")
    dev = select_device(device)
    return Runtime(dev, select_precision(dev, precision), channels_last, apply_threads(threads))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed the process-wide RNGs that third-party layers (dropout) draw from.  Data order and
    augmentation use their own per-epoch generators (see loop.py), not these."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True

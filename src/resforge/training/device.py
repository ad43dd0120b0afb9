"""Where and in which precision to run: chosen once, passed around explicitly."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype; None = plain fp32
    channels_last: bool

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
        return f"{self.device} {self.precision} {layout}"


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512_BF16 / AMX).  Without it bf16 autocast
    is emulated and several times *slower* than fp32 (measured: 10 vs 110 img/s on an
    AVX2-only EPYC for a small conv net), so 'auto' must not pick it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={pref} but no CUDA device is available; use device=cpu or auto")
    return device


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
    return torch.bfloat16 if cpu_has_native_bf16() else None


def make_runtime(device: str = "auto", precision: str = "auto", channels_last: bool = True) -> Runtime:
    dev = select_device(device)
    return Runtime(dev, select_precision(dev, precision), channels_last)


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

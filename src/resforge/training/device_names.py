"""Device strings as users write them (Ultralytics/timm style), parsed without importing torch,
so a bad train.device is reported at config-resolve time in a fraction of a second."""
from __future__ import annotations

import re

DEVICE_FORMS = "auto, cpu, mps, cuda, cuda:N, or GPU indices as Ultralytics/timm write them (0, or 0,1)"
_ONE = re.compile(r"(?:cuda:)?([0-9]+)")


def parse_device(text) -> tuple[str, ...]:
    """A device as users write it -> canonical torch names, without touching any hardware:
    'auto' | 'cpu' | 'mps' | 'cuda' -> (itself,); '0' / 'cuda:0' -> ('cuda:0',);
    '0,1' -> ('cuda:0', 'cuda:1').  Anything else raises ValueError listing the accepted forms."""
    s = str(text).strip().lower().replace(" ", "")
    if s in ("auto", "cpu", "mps", "cuda"):
        return (s,)
    parts = s.split(",")
    matches = [_ONE.fullmatch(p) for p in parts]
    if s and all(matches):
        return tuple(f"cuda:{int(m.group(1))}" for m in matches)
    raise ValueError(f"device={text!r} is not one of {DEVICE_FORMS}")


def one_device(text) -> str:
    """parse_device, for a command that runs on one device: a list of GPUs is a ValueError."""
    names = parse_device(text)
    if len(names) > 1:
        raise ValueError(f"device={text} asks for {len(names)} GPUs, but resforge trains on one device per "
                         f"process: pick one, e.g. device={names[0].split(':')[1]} (multi-GPU data-parallel "
                         "training would need torchrun, one process per GPU, which resforge does not set up)")
    return names[0]

"""Named limits on what a data source can make resforge allocate, checked before allocating.

A data file is input: its labels, declared array shapes and image sizes decide how much memory
and work a load takes, so each is bounded here and a breach is one sentence naming the limit
and how to raise it. Defaults, each settable by an environment variable:

    max_classes     100000   RESFORGE_MAX_CLASSES     classes a source may define (K of the head)
    max_image_side  4096     RESFORGE_MAX_IMAGE_SIDE  height/width of the stored uint8 tensors
    max_bytes       (auto)   RESFORGE_MAX_DATA_BYTES  decoded bytes of a whole data set; by
                                                      default the memory available right now
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MAX_CLASSES = 100_000
DEFAULT_MAX_IMAGE_SIDE = 4096          # = artifact.DEFAULT_MAX_IMAGE_SIDE = config.MAX_IMAGE_SIZE: one limit
ENV = {"max_classes": "RESFORGE_MAX_CLASSES", "max_image_side": "RESFORGE_MAX_IMAGE_SIDE",
       "max_bytes": "RESFORGE_MAX_DATA_BYTES"}


@dataclass(frozen=True)
class DataLimits:
    max_classes: int = DEFAULT_MAX_CLASSES
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    max_bytes: int | None = None     # None: the memory available at check time (MemAvailable)

    @classmethod
    def from_env(cls) -> "DataLimits":
        values = {}
        for field, var in ENV.items():
            raw = os.environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[field] = int(float(raw))
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number; set it to a positive integer") from None
            if values[field] < 1:
                raise ValueError(f"{var}={raw!r} must be a positive integer")
        return cls(**values)

    def check_classes(self, k: int, what: str) -> None:
        if k > self.max_classes:
            raise ValueError(f"{what} defines {k} classes, more than the limit max_classes="
                             f"{self.max_classes}; labels must be class indices 0..K-1 (raise the limit "
                             f"with {ENV['max_classes']} if the data set really has that many)")

    def check_side(self, size, what: str) -> None:
        if max(size) > self.max_image_side:
            raise ValueError(f"{what}: image size {size[0]}x{size[1]} exceeds the limit max_image_side="
                             f"{self.max_image_side}; set data.image_size smaller (or raise "
                             f"{ENV['max_image_side']})")

    def check_bytes(self, nbytes: int, what: str) -> None:
        """nbytes (Python int, no overflow) against max_bytes or the available memory."""
        budget, source = self._byte_budget()
        if budget is not None and nbytes > budget:
            raise ValueError(f"{what} needs {_gib(nbytes)} of memory, more than the limit max_bytes = "
                             f"{_gib(budget)} ({source}); use a smaller data.image_size, data.stream=true "
                             f"for image folders, or set {ENV['max_bytes']}")

    def _byte_budget(self) -> tuple[int | None, str]:
        if self.max_bytes is not None:
            return self.max_bytes, f"set by {ENV['max_bytes']}"
        avail = available_memory()
        return avail, "the memory available now"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**27 else f"{n / 2**20:.3g} MiB"

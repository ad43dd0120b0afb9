"""One progress convention for every phase that can take a while (training epochs, decoding,
feature extraction, evaluation, TTA, export parity, data scans).

On a terminal: a tqdm bar on stderr saying what runs, with a count and an ETA; it disappears when
the phase ends (leave=False), so finished phases leave only their result lines. Off a terminal
(logs, pipes, tests): no bar, and a phase still running after ANNOUNCE_AFTER_S prints one line
("evaluating val: 5000 img...") and one when it ends, so a log never goes silent for minutes
while short phases print nothing. Only the main process of a distributed run shows anything.

RESFORGE_PROGRESS=1 forces the bars off a terminal too (e.g. under `script` or in tests),
RESFORGE_PROGRESS=0 turns bars and lines off; unset or "auto": the rule above.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Iterable, Iterator

from tqdm.auto import tqdm

ANNOUNCE_AFTER_S = 10.0     # off a terminal, a phase this long gets a start line (short ones stay quiet)


def mode() -> str:
    """'bar', 'line' or 'off' for this process, from RESFORGE_PROGRESS and whether stderr is a terminal."""
    from resforge.runs import is_main_process        # lazy: runs imports torch, the data layer must not

    env = os.environ.get("RESFORGE_PROGRESS", "auto").strip().lower()
    if env in ("0", "false", "off", "no") or not is_main_process():
        return "off"
    if env in ("1", "true", "on", "yes"):
        return "bar"
    return "bar" if _isatty(sys.stderr) else "line"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):       # replaced or closed stream
        return False


class Bar(tqdm):
    """tqdm with the convention above; use it as a context manager (or close it): off a terminal
    it is a disabled tqdm plus a timer that prints the start line once the phase runs long."""

    def __init__(self, iterable=None, *, desc: str, total=None, unit: str = "img", enabled: bool = True,
                 announce: bool = True, **kwargs):
        """enabled: False shows nothing (e.g. train.progress=false); announce: False keeps a long
        phase silent off a terminal too, for loops that log their own lines (training epochs)."""
        m = mode() if enabled else "off"
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        super().__init__(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                         disable=m != "bar", file=sys.stderr, **kwargs)
        self._label, self._count, self._unit = desc, total, unit
        self._t0, self._announced, self._timer = time.perf_counter(), False, None
        if m == "line" and announce:
            self._timer = threading.Timer(ANNOUNCE_AFTER_S, self._announce)
            self._timer.daemon = True
            self._timer.start()

    def _announce(self) -> None:
        self._announced = True
        count = f": {self._count} {self._unit}" if self._count else ""
        print(f"{self._label}{count}...", file=sys.stderr, flush=True)

    def close(self) -> None:
        timer, self._timer = getattr(self, "_timer", None), None
        if timer is not None:
            timer.cancel()
            if self._announced:
                print(f"{self._label}: done in {time.perf_counter() - self._t0:.0f}s", file=sys.stderr, flush=True)
        super().close()


def track(iterable: Iterable, desc: str, *, total: int | None = None, unit: str = "img",
          enabled: bool = True) -> Iterator:
    """Iterate `iterable` under a Bar; the bar closes when the loop ends, breaks or raises."""
    with Bar(iterable, desc=desc, total=total, unit=unit, enabled=enabled) as bar:
        yield from bar

"""Micro-batching: single images from concurrent requests share one model call.

Why: a convnet on a CPU runs a batch of 16 in far less than 16 times the time of one image,
so under load, waiting a few milliseconds to group requests raises throughput; with a
single client nothing is waited for beyond `max_wait_ms`.

The batcher owns one worker task on the event loop and one model thread: the task takes the
first queued image, keeps taking more until `max_batch` are there or `max_wait_ms` passed,
then runs the model in the thread (the loop keeps accepting requests meanwhile) and resolves
each image's future with its row of the output. `max_batch=1` turns batching off.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More images are queued than `max_queue`: shed load instead of growing latency forever."""


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)   # batch size -> how many batches

    def add(self, n: int) -> None:
        self.batches, self.images, self.largest = self.batches + 1, self.images + n, max(self.largest, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1

    def as_dict(self) -> dict:
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "largest_batch": self.largest,
                "mean_batch": round(mean, 2)}


class MicroBatcher:
    """fn: float32 (B, C, H, W) -> (B, K) array, called from one worker thread at a time."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1; got "
                             f"{max_batch}, {max_wait_ms}, {max_queue}")
        self.fn, self.max_batch, self.max_wait = fn, int(max_batch), max_wait_ms / 1000.0
        self.max_queue = int(max_queue)
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="resforge-model")
        self._task = asyncio.create_task(self._run(), name="resforge-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():   # nobody will answer these now
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def submit(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Queue (C, H, W) float32 images; returns their output rows in the same order."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} images are waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for img, fut in zip(images, futures):
            self._queue.put_nowait((img, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            batch = [(x, f) for x, f in batch if not f.done()]      # client gone: skip its work
            if not batch:
                continue
            self.stats.add(len(batch))
            try:
                out = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.fn, np.stack([x for x, _ in batch]))
            except Exception as e:  # noqa: BLE001 — hand the failure to the waiting requests
                log.exception("model call failed on a batch of %d", len(batch))
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for i, (_, f) in enumerate(batch):
                if not f.done():
                    f.set_result(out[i])

    async def _collect(self) -> list:
        """The first waiting item, then more until max_batch or max_wait after the first."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():                 # already there: take without waiting
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

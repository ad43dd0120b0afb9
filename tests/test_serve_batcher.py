"""MicroBatcher on its own: grouping under concurrency, batching off, failures, overload."""
import asyncio
import threading
import time

import numpy as np
import pytest

from resforge.serve.batcher import MicroBatcher, Overloaded


class Recorder:
    """Model stand-in: row i of the output is input i's sum; records batch sizes and threads."""

    def __init__(self, delay: float = 0.0):
        self.sizes, self.threads, self.delay = [], set(), delay

    def __call__(self, x: np.ndarray) -> np.ndarray:       # (B, C, H, W) -> (B, 1)
        self.sizes.append(len(x))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return x.reshape(len(x), -1).sum(1, keepdims=True)


def _run(coro):
    return asyncio.run(coro)


async def _many(batcher: MicroBatcher, n: int) -> list[float]:
    await batcher.start()
    try:
        imgs = [np.full((1, 2, 2), i, np.float32) for i in range(n)]
        rows = await asyncio.gather(*(batcher.submit([img]) for img in imgs))
        return [float(r[0][0]) for r in rows]
    finally:
        await batcher.stop()


def test_concurrent_submits_share_model_calls_and_keep_order():
    model = Recorder(delay=0.01)
    b = MicroBatcher(model, max_batch=8, max_wait_ms=20)
    out = _run(_many(b, 20))
    assert out == [4.0 * i for i in range(20)]                 # each caller gets its own row
    assert sum(model.sizes) == 20 and max(model.sizes) == 8 and len(model.sizes) <= 4
    assert b.stats.as_dict()["largest_batch"] == 8 and len(model.threads) == 1


def test_max_batch_one_turns_batching_off():
    model = Recorder()
    out = _run(_many(MicroBatcher(model, max_batch=1, max_wait_ms=50), 5))
    assert out == [0.0, 4.0, 8.0, 12.0, 16.0] and model.sizes == [1] * 5


def test_lone_request_waits_at_most_max_wait():
    async def go():
        b = MicroBatcher(Recorder(), max_batch=64, max_wait_ms=30)
        await b.start()
        t0 = time.perf_counter()
        await b.submit([np.zeros((1, 2, 2), np.float32)])
        dt = time.perf_counter() - t0
        await b.stop()
        return dt
    assert 0.025 <= _run(go()) < 1.0


def test_model_failure_reaches_every_waiting_request_and_batcher_survives():
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(x), 1), np.float32)

    async def go():
        b = MicroBatcher(flaky, max_batch=4, max_wait_ms=20)
        await b.start()
        img = np.zeros((1, 2, 2), np.float32)
        first = await asyncio.gather(b.submit([img, img]), return_exceptions=True)
        second = await b.submit([img])
        await b.stop()
        return first, second
    first, second = _run(go())
    assert isinstance(first[0], RuntimeError) and "boom" in str(first[0])
    assert second[0].shape == (1,)


def test_overload_and_bad_settings():
    async def go():
        b = MicroBatcher(Recorder(delay=0.2), max_batch=1, max_wait_ms=0, max_queue=3)
        await b.start()
        img = np.zeros((1, 2, 2), np.float32)
        busy = asyncio.ensure_future(b.submit([img] * 3))
        await asyncio.sleep(0)                               # queued, model busy with the first
        with pytest.raises(Overloaded, match="limit 3"):
            await b.submit([img] * 2)
        await busy
        await b.stop()
    _run(go())
    with pytest.raises(ValueError, match="max_batch >= 1"):
        MicroBatcher(Recorder(), max_batch=0)

"""Load test of `resforge serve` on loopback: p50/p99 latency, throughput and errors, with
micro-batching on and off, side by side.

The server runs in a subprocess exactly as a user starts it; the client fires N requests
(one 32x32 PNG each) from C concurrent threads with keep-alive sessions. Client and server
share this machine's cores, so absolute numbers are pessimistic; the on/off ratio is the point.

    python bench/serve_load.py [--requests 1000] [--concurrency 16] [--source RUN_OR_EXPORT]

Without --source a random-weight ResNet-20 (32x32, 10 classes) checkpoint is made in a
temporary folder.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deploy_helpers import running_server  # noqa: E402  (the tests' server launcher)

MODES = {"batching on (max-batch 32, wait 5 ms)": ["--max-batch", "32", "--max-wait-ms", "5"],
         "batching off (max-batch 1)": ["--max-batch", "1"]}


def make_checkpoint(folder: Path) -> Path:
    from resforge.checkpoint import save_checkpoint
    from resforge.models import create_model
    meta = {"model": {"name": "resnet20", "num_classes": 10, "in_chans": 3, "kwargs": {}},
            "class_names": [f"class{i}" for i in range(10)], "input_size": [3, 32, 32],
            "mean": [0.5] * 3, "std": [0.25] * 3, "metrics": {}}
    save_checkpoint(folder / "weights" / "best", create_model("resnet20", num_classes=10), meta)
    return folder


def payloads(n: int = 32) -> list[bytes]:
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def load(url: str, n: int, concurrency: int, images: list[bytes]) -> dict:
    local = threading.local()

    def one(i: int):
        if not hasattr(local, "session"):                 # one keep-alive session per thread
            local.session = requests.Session()
        s = local.session
        t0 = time.perf_counter()
        try:
            r = s.post(f"{url}/v1/predict?topk=1", files={"file": (f"{i}.png", images[i % len(images)])}, timeout=60)
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        return time.perf_counter() - t0, ok

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(2 * concurrency)))              # warm-up: connections, primitives
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    lat = sorted(1000 * t for t, _ in results)
    stats = requests.get(f"{url}/healthz").json()["batching"]
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "rps": n / wall, "errors": sum(not ok for _, ok in results), "mean_batch": stats["mean_batch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--source", default=None, help="run folder, weights or export to serve")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="server model threads (resforge serve --threads)")
    a = ap.parse_args()
    extra = ["--threads", str(a.threads)] if a.threads else []
    print(f"{a.requests} requests, {a.concurrency} concurrent, loopback, {os.cpu_count()} cores, "
          f"load avg {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        source = a.source or make_checkpoint(Path(tmp) / "ckpt")
        images, results = payloads(), {}
        for mode, flags in MODES.items():
            with running_server(source, "--log-level", "warning", "--backend", a.backend, *extra, *flags) as url:
                results[mode] = load(url, a.requests, a.concurrency, images)
            print(f"  measured {mode}", flush=True)
    head = f"{'mode':<40}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}{'mean batch':>12}"
    print("\n" + head + "\n" + "-" * len(head))
    for mode, r in results.items():
        print(f"{mode:<40}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['rps']:>9.1f}{r['errors']:>8}{r['mean_batch']:>12.2f}")
    on, off = results.values()
    print(f"batching on / off: throughput {on['rps'] / off['rps']:.2f}x, p99 {on['p99'] / off['p99']:.2f}x")
    print(f"load avg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

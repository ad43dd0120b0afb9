"""Shared by the export / serve / batch-predict tests: one tiny trained run per test session,
free ports, a real `resforge serve` subprocess, and one torch thread.

One thread (`torch_one_thread`, `--threads 1` for servers): these tests run tiny inputs where
threads buy nothing, and on a shared, oversubscribed CPU torch's OpenMP threads can run 10x
slower at 2 threads than at 1 (measured); one thread keeps the tests fast under any load.

Not a conftest: the run is cached under pytest's session base temp folder, so every test
file that asks for it reuses the first one's (training it once costs ~5 s).
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """Import into a test module to run its tests with one torch thread."""
    with one_thread():
        yield


def trained_run(tmp_path_factory) -> Path:
    """A 1-epoch resnet20 on digits at 8x8 (1 channel, 10 classes); returns its run folder."""
    root = tmp_path_factory.getbasetemp() / "deploy-digits"
    run = root / "runs" / "x"
    if not (run / "weights" / "best.safetensors").is_file():
        import resforge
        with one_thread():
            resforge.train("digits", ["data.image_size=8", "train.epochs=1", "train.progress=false",
                                      f"train.project={root / 'runs'}", "train.name=x",
                                      f"data.cache_dir={root / 'cache'}"])
    return run


def png_bytes(value: int = 128, size=(12, 12), mode: str = "L", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(buf, fmt)
    return buf.getvalue()


def digit_images(run: Path, n: int = 8) -> list[tuple[str, bytes, int]]:
    """(name, PNG bytes, label) of real test digits of the run's data, upscaled to 32x32."""
    from resforge.config import load_config
    from resforge.pipeline import prepare_data
    import json
    cfg = json.loads((run / "config.json").read_text())
    bundle, _ = prepare_data(load_config(None, None, base=cfg))
    split = bundle.splits["test"]
    out = []
    for i in range(n):
        arr = np.asarray(split.images[i])[0]                       # (H, W) uint8
        buf = io.BytesIO()
        Image.fromarray(arr).resize((32, 32), Image.NEAREST).save(buf, "PNG")
        out.append((f"digit{i}.png", buf.getvalue(), int(split.labels[i])))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(source, *args: str, timeout: float = 90.0):
    """`python -m resforge.cli serve SOURCE --port P ARGS...` on 127.0.0.1; yields its base URL."""
    import requests

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(Path(str(source)).parent / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "resforge.cli", "serve", str(source), "--port", str(port),
                             *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()}")
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on {url} not up after {timeout}s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def random_checkpoint(folder: Path, *, size: int = 32, channels: int = 3, classes: int = 10,
                      class_names: list[str] | None = None, poison=None) -> Path:
    """An untrained resnet20 checkpoint (seed 0) at `size` px; `poison(model)` may edit its
    weights first. class_names (default c0..c{classes-1}) may disagree with the head on purpose."""
    from resforge.checkpoint import save_checkpoint
    from resforge.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=classes, in_chans=channels).eval()
    if poison is not None:
        poison(model)
    meta = {"model": {"name": "resnet20", "num_classes": classes, "in_chans": channels, "kwargs": {}},
            "class_names": class_names or [f"c{i}" for i in range(classes)], "input_size": [channels, size, size],
            "mean": [0.5] * channels, "std": [0.25] * channels}
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(folder / "best", model, meta)

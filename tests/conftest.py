"""Shared pytest fixtures: where the read-only real data lives, and an isolated cache dir."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real data (RESFORGE_SHARED_DATA, else ../shared/data next to the repo)."""
    env = os.environ.get("RESFORGE_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set RESFORGE_SHARED_DATA)")
    return path


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """RESFORGE_CACHE (and RESFORGE_DATA) pointed at fresh temporary folders."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RESFORGE_CACHE", str(cache))
    monkeypatch.setenv("RESFORGE_DATA", str(tmp_path / "data"))
    return cache


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One decoded-tensor cache for the whole test session, so CIFAR's 140 MB .tar.xz is
    decompressed once, not once per test."""
    return tmp_path_factory.mktemp("resforge-cache")


@pytest.fixture(scope="session")
def cifar10_archive(shared_data) -> Path:
    path = shared_data / "cifar-10-binary.tar.xz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-batch tests: they run fastest so, and stay fast
    when other jobs share the cores (spinning OpenMP threads collapse under oversubscription)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

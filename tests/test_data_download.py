"""download_cifar against a local HTTP server: MD5 verified, atomic, then loadable."""
import functools
import hashlib
import io
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from resforge.data import download_cifar, load_source


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (base url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www
    httpd.shutdown()
    httpd.server_close()


def fake_cifar10_binary(path, n=3):
    """A tiny archive in the official binary layout (n records per batch)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tf:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            rec = np.column_stack([rng.integers(0, 10, n), rng.integers(0, 256, (n, 3072))])
            data = rec.astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_download_verifies_md5_then_loads(server, tmp_path, tmp_cache):
    base, www = server
    archive = fake_cifar10_binary(www / "cifar-10-binary.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "data"
    got = download_cifar("cifar-10-binary", root, url=base + archive.name, md5=md5, progress=False)
    assert got == root / "cifar-10-binary.tar.gz" and got.read_bytes() == archive.read_bytes()
    assert [p.name for p in root.iterdir()] == ["cifar-10-binary.tar.gz"]   # no .part left
    b = load_source("cifar10", data_root=root)
    assert b.splits["train"].images.shape == (15, 3, 32, 32) and len(b.splits["test"].labels) == 3


def test_md5_mismatch_leaves_nothing(server, tmp_path):
    base, www = server
    archive = fake_cifar10_binary(www / "cifar-10-binary.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 mismatch.*expected c32a1d4ab5d03f1284b67883e8d87530"):
        download_cifar("cifar-10-binary", root, url=base + archive.name, progress=False)
    assert list(root.iterdir()) == []


def test_http_error_is_raised(server, tmp_path):
    base, _ = server
    root = tmp_path / "data"
    with pytest.raises(OSError, match="404.*put it at .*cifar-100-python.tar.gz"):
        download_cifar("cifar-100-python", root, url=base + "missing.tar.gz", progress=False)
    assert list(root.iterdir()) == []

"""HTTP inference service (optional extra: `pip install resforge[serve]`).

    resforge serve runs/x                         # eager PyTorch, http://127.0.0.1:8000
    resforge serve runs/x/weights/best.onnx       # ONNX Runtime
    resforge serve runs/x --backend onnx          # export (parity-checked) on first use

`create_app(source, backend=..., max_batch=..., max_wait_ms=..., max_upload_bytes=...,
max_pixels=..., max_request_pixels=..., max_decodes=..., decode_wait_s=..., body_timeout_s=...)`
builds the FastAPI app (serve/app.py); `serve()` runs it with uvicorn, adding the connection
limits of serve/guard.py (header_timeout_s, max_connections). FastAPI and uvicorn are imported
only here, lazily, so the rest of resforge works without them.
"""
from __future__ import annotations

import logging

from resforge.backends import missing_extra

log = logging.getLogger("resforge.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVER_DEFAULTS = {"header_timeout_s": 10.0, "max_connections": 64}


def create_app(source, **kwargs):
    from resforge.serve.app import create_app as _create_app
    return _create_app(source, **kwargs)


def serve(source, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          header_timeout_s: float = SERVER_DEFAULTS["header_timeout_s"],
          max_connections: int = SERVER_DEFAULTS["max_connections"], **kwargs) -> None:
    """Build the app for `source` and serve it until interrupted (kwargs: see create_app)."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    if not header_timeout_s > 0 or not max_connections >= 1:
        raise ValueError(f"need header_timeout_s > 0 and max_connections >= 1, got {header_timeout_s}, "
                         f"{max_connections}")
    from resforge.serve.guard import protocol
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    if host not in LOOPBACK:
        log.warning("listening on %s: reachable from other machines; put it behind a reverse proxy "
                    "or load balancer that terminates TLS", host)
    _return_freed_memory()
    app = create_app(source, **kwargs)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=log_level == "debug",
                http=protocol(header_timeout_s, max_connections))


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the OS. Its mmap threshold otherwise grows
    to 32 MB after the first big free, so decoded images land in heap arenas that are never
    returned (measured: 8 decodes of a 6000x6000 PNG left +51 MB resident with 1 thread,
    +101 MB with 2; with a fixed 1 MiB threshold +4 / +8 MB)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)      # M_MMAP_THRESHOLD = 1 MiB (fixed: no dynamic growth)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): leave the allocator be
        pass

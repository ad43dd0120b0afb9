"""HTTP inference service (optional extra: `pip install resforge[serve]`).

    resforge serve runs/x                         # eager PyTorch, http://127.0.0.1:8000
    resforge serve runs/x/weights/best.onnx       # ONNX Runtime
    resforge serve runs/x --backend onnx          # export (parity-checked) on first use

`create_app(source, backend=..., max_batch=..., max_wait_ms=..., max_upload_bytes=...,
max_pixels=...)` builds the FastAPI app (serve/app.py); `serve()` runs it with uvicorn.
FastAPI and uvicorn are imported only here, lazily, so the rest of resforge works without them.
"""
from __future__ import annotations

import logging

from resforge.backends import missing_extra

log = logging.getLogger("resforge.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(source, **kwargs):
    from resforge.serve.app import create_app as _create_app
    return _create_app(source, **kwargs)


def serve(source, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs) -> None:
    """Build the app for `source` and serve it until interrupted (kwargs: see create_app)."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    if host not in LOOPBACK:
        log.warning("listening on %s: reachable from other machines; put it behind a reverse proxy "
                    "or load balancer that terminates TLS", host)
    app = create_app(source, **kwargs)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=log_level == "debug")

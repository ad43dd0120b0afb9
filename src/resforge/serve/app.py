"""The FastAPI application: routes, JSON errors, and the model behind a micro-batcher.

    POST /v1/predict?topk=5   multipart/form-data, one or more image files (any field name)
    GET  /v1/model            architecture, classes, input size, versions, metrics, limits
    GET  /healthz             liveness + batching statistics
    GET  /                    a page to drop an image on and see the top-k classes as bars

Imported only through resforge.serve.create_app, so FastAPI can be imported at the top here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np

from resforge import __version__
from resforge.backends import missing_extra
from resforge.serve.batcher import MicroBatcher, Overloaded
from resforge.serve.uploads import ApiError, BodyLimit, decode_upload, error_body

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
except ImportError:
    raise missing_extra("fastapi", "serve") from None

log = logging.getLogger("resforge.serve")

DEFAULTS = {"max_batch": 32, "max_wait_ms": 5.0, "max_upload_bytes": 20_000_000,
            "max_pixels": 40_000_000, "max_files": 64, "max_queue": 1024}


def create_app(source, *, backend: str = "auto", model_name: str | None = None,
               max_batch: int = DEFAULTS["max_batch"], max_wait_ms: float = DEFAULTS["max_wait_ms"],
               max_upload_bytes: int = DEFAULTS["max_upload_bytes"], max_pixels: int = DEFAULTS["max_pixels"],
               max_files: int = DEFAULTS["max_files"], max_queue: int = DEFAULTS["max_queue"],
               threads: int | None = None):
    """A FastAPI app serving `source` (run folder, checkpoint, weights or .onnx/.torchscript)."""
    from resforge.backends import load_backend
    from resforge.infer import Preprocess

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("max_files", max_files)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model = load_backend(source, backend, model_name=model_name, threads=threads)
    limits = {"max_upload_bytes": int(max_upload_bytes), "max_pixels": int(max_pixels),
              "max_files": int(max_files), "max_batch": int(max_batch), "max_wait_ms": float(max_wait_ms)}
    state = _State(model, Preprocess(model.meta, max_pixels=max_pixels),
                   MicroBatcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue),
                   limits)

    @asynccontextmanager
    async def lifespan(app):
        await state.batcher.start()
        log.info("serving %s (%s backend), micro-batching up to %d within %.1f ms",
                 model.meta["model"]["name"], model.name, max_batch, max_wait_ms)
        yield
        await state.batcher.stop()

    app = FastAPI(title="resforge", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    return app


class _State:
    def __init__(self, model, prep, batcher: MicroBatcher, limits: dict):
        self.model, self.prep, self.batcher, self.limits = model, prep, batcher, limits
        self.started = time.time()
        self.page = resources.files("resforge.serve").joinpath("page.html").read_text(encoding="utf-8")

    def model_info(self) -> dict:
        m = self.model.meta
        return {"architecture": m["model"]["name"], "num_classes": len(m["class_names"]),
                "classes": m["class_names"], "input_size": m["input_size"], "mean": m["mean"],
                "std": m["std"], "resize": m.get("resize", "shorter-center-crop"),
                "backend": self.model.name, "version": {"resforge": __version__,
                                                        "checkpoint": m.get("resforge_version")},
                "epoch": m.get("epoch"), "metrics": m.get("metrics", {}), "limits": self.limits}


def _add_routes(app, state: _State) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(state.page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 1),
                "batching": state.batcher.stats.as_dict()}

    @app.get("/v1/model")
    async def model_info():
        return state.model_info()

    @app.post("/v1/predict")
    async def predict(request: Request, topk: int = 5):
        k = len(state.model.meta["class_names"])
        if not 1 <= topk <= k:
            raise ApiError(422, f"topk must be between 1 and {k} (the number of classes), got {topk}")
        files = await _read_files(request, state.limits["max_files"])
        arrays = await asyncio.gather(*(asyncio.to_thread(decode_upload, state.prep, data, name)
                                        for name, data in files))
        x = state.prep.batch(list(arrays))                      # (n, C, H, W) float32
        try:
            logits = await state.batcher.submit(list(x))
        except Overloaded as e:
            raise ApiError(503, f"server busy: {e}; retry shortly") from None
        probs = _softmax(np.stack(logits))                      # (n, K)
        return {"model": state.model.meta["model"]["name"],
                "predictions": [{"filename": name, "topk": _topk(p, state.model.meta["class_names"], topk)}
                                for (name, _), p in zip(files, probs)]}


async def _read_files(request, max_files: int) -> list[tuple[str, bytes]]:
    """[(filename, bytes)] of every file part of a multipart body; ApiError otherwise."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(415, f"expected multipart/form-data with image files, got content-type "
                            f"{ctype or 'none'!r}: e.g. curl -F file=@cat.jpg URL/v1/predict")
    try:
        form = await request.form(max_files=max_files, max_fields=max_files)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 — malformed multipart or too many parts
        detail = getattr(e, "detail", None) or str(e)
        if "Too many" in detail:
            raise ApiError(413, f"too many parts: at most {max_files} files per request ({detail})") from None
        raise ApiError(400, f"bad multipart body: {detail}") from None
    files = [(v.filename or key, await v.read()) for key, v in form.multi_items() if isinstance(v, UploadFile)]
    await form.close()
    if not files:
        raise ApiError(400, "no image file in the request: send one or more files as multipart/form-data, "
                            "e.g. curl -F file=@cat.jpg URL/v1/predict")
    return files


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _topk(probs: np.ndarray, names: list[str], k: int) -> list[dict]:
    top = np.argsort(-probs, kind="stable")[:k]
    return [{"label": names[i], "index": int(i), "prob": float(probs[i])} for i in top]


def _add_error_handlers(app) -> None:
    def reply(status: int, message: str) -> JSONResponse:
        return JSONResponse(error_body(status, message), status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return reply(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        messages = {404: f"no route {request.url.path}: see GET / , GET /v1/model, POST /v1/predict",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return reply(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        parts = [f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.errors()]
        return reply(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):       # a bug, not a bad request: logged in full
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return reply(500, f"internal error ({type(exc).__name__}); see the server log")

"""The FastAPI application: routes, JSON errors, and the model behind a micro-batcher.

    POST /v1/predict?topk=5   multipart/form-data, one or more image files (any field name); each answer
                              has the top-k classes and, if the model carries an OOD threshold (resforge.ood),
                              ood_score and ood (true: unlike the training data)
    GET  /v1/model            architecture, classes, input size, versions, metrics, limits, OOD threshold
    GET  /healthz             liveness + batching and memory statistics
    GET  /                    a page to drop an image on and see the top-k classes as bars

Bounded work per request: body bytes, files, pixels per image and per request (all checked
from the headers before any pixel is decoded), and at most `max_decodes` requests decoding at
once, one image at a time each; a request that waited `decode_wait_s` for a decode slot gets a
503. Memory above the model: at most max_decodes x max_pixels x ~13 bytes of decoding (the
worst measured modes, float TIFF and RGBA PNG; grey 6, RGB 10) plus the request bodies held,
max_connections x max_upload_bytes. Before serving, one synthetic image
goes through the whole predict path (self-test): an artifact whose outputs do not fit its
class names, or are not finite, is refused with the reason instead of answering with 500s.

Imported only through resforge.serve.create_app, so FastAPI can be imported at the top here.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np

from resforge import __version__, ood
from resforge.backends import missing_extra
from resforge.serve.batcher import MicroBatcher, Overloaded
from resforge.serve.uploads import ApiError, BodyLimit, decode_files, error_body

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
            "max_pixels": 40_000_000, "max_files": 64, "max_queue": 1024,
            "max_request_pixels": 100_000_000, "max_decodes": 2, "decode_wait_s": 10.0, "body_timeout_s": 30.0}
PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (JPEG, PNG, GIF, TIFF, WebP, BMP, PNM)"}}}}}},
    "responses": {"200": {"description": "the top-k classes of every image, in upload order", "content": {
        "application/json": {"schema": {"type": "object", "required": ["model", "predictions"], "properties": {
            "model": {"type": "string", "description": "architecture"},
            "predictions": {"type": "array", "items": {
                "type": "object", "required": ["filename", "topk"], "properties": {
                    "filename": {"type": "string"},
                    "topk": {"type": "array", "items": {"type": "object", "properties": {
                        "label": {"type": "string"}, "index": {"type": "integer"},
                        "prob": {"type": "number", "minimum": 0, "maximum": 1}}}},
                    "ood_score": {"type": "number", "description": (
                        "only when the model carries an OOD threshold (GET /v1/model: ood): the score "
                        "ood.score names, msp = -log(max softmax probability) or energy = "
                        "-logsumexp(logits); higher = less like the training data")},
                    "ood": {"type": "boolean", "description": (
                        "only with ood_score: true when ood_score is above the threshold fitted on the "
                        "validation split (about 5% of in-distribution images are flagged by design)")}}}}}}}}}}}


class ArtifactRejected(ValueError):
    """The artifact loaded but fails the startup self-test: the service does not start."""


def create_app(source, *, backend: str = "auto", model_name: str | None = None,
               max_batch: int = DEFAULTS["max_batch"], max_wait_ms: float = DEFAULTS["max_wait_ms"],
               max_upload_bytes: int = DEFAULTS["max_upload_bytes"], max_pixels: int = DEFAULTS["max_pixels"],
               max_files: int = DEFAULTS["max_files"], max_queue: int = DEFAULTS["max_queue"],
               max_request_pixels: int = DEFAULTS["max_request_pixels"], max_decodes: int = DEFAULTS["max_decodes"],
               decode_wait_s: float = DEFAULTS["decode_wait_s"], body_timeout_s: float = DEFAULTS["body_timeout_s"],
               threads: int | None = None):
    """A FastAPI app serving `source` (run folder, checkpoint, weights or .onnx/.torchscript);
    raises ArtifactRejected (a ValueError) when the artifact fails the self-test."""
    from resforge.backends import load_backend
    from resforge.infer import Preprocess

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("max_files", max_files),
                        ("max_request_pixels", max_request_pixels), ("max_decodes", max_decodes),
                        ("decode_wait_s", decode_wait_s), ("body_timeout_s", body_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    model = load_backend(source, backend, model_name=model_name, threads=threads)
    limits = {"max_upload_bytes": int(max_upload_bytes), "max_pixels": int(max_pixels),
              "max_files": int(max_files), "max_batch": int(max_batch), "max_wait_ms": float(max_wait_ms),
              "max_request_pixels": int(max_request_pixels), "max_decodes": int(max_decodes),
              "decode_wait_s": float(decode_wait_s), "body_timeout_s": float(body_timeout_s)}
    prep = Preprocess(model.meta, max_pixels=max_pixels)
    self_test(model, prep, source)
    state = _State(model, prep, MicroBatcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                             max_queue=max_queue), limits)

    @asynccontextmanager
    async def lifespan(app):
        await state.batcher.start()
        log.info("serving %s (%s backend%s), micro-batching up to %d within %.1f ms",
                 model.meta["model"]["name"], model.name, ", int8" if model.meta.get("quantization") else "",
                 max_batch, max_wait_ms)
        yield
        await state.batcher.stop()
        state.decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="resforge", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes, body_timeout_s=body_timeout_s)
    return app


def self_test(model, prep, source) -> None:
    """One synthetic mid-grey image of the model's input size through decode, preprocessing and
    the model: the output must be (1, K) with K = len(class_names) and finite probabilities."""
    from PIL import Image

    names = model.meta.get("class_names") or []
    c, h, w = prep.channels, prep.height, prep.width
    buf = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (w, h), 128 if c == 1 else (128,) * 3).save(buf, "PNG")
    try:
        x = prep.batch(decode_files(prep, [("self-test.png", buf.getvalue())], prep.max_pixels))
        out = np.asarray(model(x))
    except Exception as e:  # noqa: BLE001 — whatever breaks here would break every request
        raise ArtifactRejected(f"refusing to serve {source}: a {w}x{h} test image fails in the model "
                               f"({type(e).__name__}: {e})") from None
    problem = None
    if not names:
        problem = "it names no classes (class_names is empty or missing)"
    elif out.shape != (1, len(names)):
        problem = (f"its output for one image has shape {tuple(out.shape)} but it names {len(names)} classes, "
                   f"so it would have to be (1, {len(names)})")
    elif not np.isfinite(_softmax(out)).all():
        problem = "its output for a test image is not finite (NaN or infinite weights?)"
    if problem:
        raise ArtifactRejected(f"refusing to serve {source}: {problem}; re-export or retrain it")


class _State:
    def __init__(self, model, prep, batcher: MicroBatcher, limits: dict):
        self.model, self.prep, self.batcher, self.limits = model, prep, batcher, limits
        self.started = time.time()
        self.decoders = ThreadPoolExecutor(limits["max_decodes"], thread_name_prefix="resforge-decode")
        self.decode_slots = asyncio.Semaphore(limits["max_decodes"])
        self.page = resources.files("resforge.serve").joinpath("page.html").read_text(encoding="utf-8")

    def model_info(self) -> dict:
        m = self.model.meta
        return {"architecture": m["model"]["name"], "num_classes": len(m["class_names"]),
                "classes": m["class_names"], "input_size": m["input_size"], "mean": m["mean"],
                "std": m["std"], "resize": m.get("resize", "shorter-center-crop"),
                "backend": self.model.name, "version": {"resforge": __version__,
                                                        "checkpoint": m.get("resforge_version")},
                "epoch": m.get("epoch"), "metrics": m.get("metrics", {}), "limits": self.limits,
                "ood": m.get("ood"),           # the OOD threshold predictions are flagged with, or null
                "quantization": m.get("quantization")}   # an int8 export's record (resforge.quantize), or null

    async def decode(self, files: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """decode_files in a decode thread, once one of max_decodes slots is free; 503 after
        decode_wait_s. The slot is released when the thread finishes, not when the caller
        stops waiting, so a vanished client cannot push the decode count over the limit."""
        n, wait = self.limits["max_decodes"], self.limits["decode_wait_s"]
        try:
            await asyncio.wait_for(self.decode_slots.acquire(), wait)
        except asyncio.TimeoutError:
            raise ApiError(503, f"server busy: {n} requests are decoding images (max_decodes, --max-decodes) "
                                f"and this one waited {wait:g} s for a turn (decode_wait_s, --decode-wait-s); "
                                "retry shortly") from None
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                self.decoders, decode_files, self.prep, files, self.limits["max_request_pixels"])
        except BaseException:
            self.decode_slots.release()
            raise
        fut.add_done_callback(lambda _: self.decode_slots.release())
        return await asyncio.shield(fut)


def _add_routes(app, state: _State) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(state.page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 1),
                "batching": state.batcher.stats.as_dict(), "memory": _memory()}

    @app.get("/v1/model")
    async def model_info():
        return state.model_info()

    @app.post("/v1/predict", openapi_extra=PREDICT_BODY)
    async def predict(request: Request, topk: int = 5):
        k = len(state.model.meta["class_names"])
        if not 1 <= topk <= k:
            raise ApiError(422, f"topk must be between 1 and {k} (the number of classes), got {topk}")
        files = await _read_files(request, state.limits["max_files"])
        x = state.prep.batch(await state.decode(files))         # (n, C, H, W) float32
        try:
            logits = await state.batcher.submit(list(x))
        except Overloaded as e:
            raise ApiError(503, f"server busy: {e}; retry shortly") from None
        logits = np.stack(logits)                                # (n, K)
        preds = [{"filename": name, "topk": _topk(p, state.model.meta["class_names"], topk)}
                 for (name, _), p in zip(files, _softmax(logits))]
        record = state.model.meta.get("ood")
        if record:                                               # the model carries an OOD threshold
            scores = ood.score(logits, record)
            for p, s, flag in zip(preds, scores, ood.flagged(scores, record)):
                p["ood_score"], p["ood"] = float(s), bool(flag)
        return {"model": state.model.meta["model"]["name"], "predictions": preds}


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


def _memory() -> dict:
    """Resident and peak resident memory of this process, in MB (Linux /proc; else {})."""
    try:
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
        return {"rss_mb": round(kb["VmRSS"] / 1024, 1), "peak_rss_mb": round(kb["VmHWM"] / 1024, 1)}
    except (OSError, KeyError, ValueError):
        return {}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _topk(probs: np.ndarray, names: list[str], k: int) -> list[dict]:
    top = np.argsort(-probs, kind="stable")[:k]
    return [{"label": names[i], "index": int(i), "prob": float(probs[i])} for i in top]


def _add_error_handlers(app) -> None:
    def reply(status: int, message: str) -> JSONResponse:
        # 408/413 may leave the request body unread: close instead of reading on for the next request
        headers = {"connection": "close"} if status in (408, 413) else None
        return JSONResponse(error_body(status, message), status_code=status, headers=headers)

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

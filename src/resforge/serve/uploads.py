"""Request limits and image checks for the HTTP service; every failure is an ApiError (4xx).

* BodyLimit: an ASGI middleware refusing bodies over `max_bytes`, by Content-Length before
  reading, and by counting while streaming (chunked uploads carry no length).
* sniff(): the image type from the first bytes; the file name and declared type are not
  trusted (a .jpg may be a PNG, a .png may be an executable).
* pixel limit: read from the header before any pixel is decoded (decompression bombs: a
  50 kB PNG can inflate to gigabytes).
"""
from __future__ import annotations

import io
import json

import numpy as np

# (magic prefix, offset, type); WEBP is RIFF....WEBP, PNM is P1..P6 then whitespace.
_SIGNATURES = [(b"\xff\xd8\xff", 0, "jpeg"), (b"\x89PNG\r\n\x1a\n", 0, "png"), (b"GIF87a", 0, "gif"),
               (b"GIF89a", 0, "gif"), (b"II*\x00", 0, "tiff"), (b"MM\x00*", 0, "tiff"),
               (b"WEBP", 8, "webp"), (b"BM", 0, "bmp")]


class ApiError(Exception):
    """A bad request: HTTP status + a message saying what was wrong and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_body(status: int, message: str) -> dict:
    return {"error": message, "status": status}


def sniff(data: bytes) -> str | None:
    """'jpeg' | 'png' | 'gif' | 'tiff' | 'webp' | 'bmp' | 'pnm', or None if no image signature."""
    for magic, offset, kind in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (kind != "webp" or data[:4] == b"RIFF"):
            return kind
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    return None


def check_image(data: bytes, name: str, max_pixels: int) -> str:
    """Sniff the type and read the size from the header only; raises ApiError."""
    from PIL import Image

    if not data:
        raise ApiError(400, f"file {name!r} is empty (0 bytes)")
    kind = sniff(data)
    if kind is None:
        raise ApiError(415, f"file {name!r} is not a supported image (its content starts with "
                            f"{data[:8]!r}; the name and declared type are not trusted): send JPEG, "
                            "PNG, GIF, TIFF, WebP, BMP or PNM data")
    try:
        with Image.open(io.BytesIO(data)) as im:       # lazy: header only, no pixels yet
            w, h = im.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"file {name!r} declares more pixels than the limit of {max_pixels}") from None
    except Exception as e:  # noqa: BLE001 — any header failure is the client's file
        raise ApiError(422, f"file {name!r} looks like {kind.upper()} but its header is unreadable ({e})") from None
    if w * h > max_pixels:
        raise ApiError(413, f"file {name!r} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                            "(decompression-bomb guard): send a smaller image")
    return kind


def decode_upload(prep, data: bytes, name: str) -> np.ndarray:
    """Checked bytes -> (H, W, C) uint8 at the model's size (prep: infer.Preprocess)."""
    from resforge.data.images import ImageError

    check_image(data, name, prep.max_pixels)
    try:
        return prep.decode(data)
    except ImageError as e:
        raise ApiError(422, f"file {name!r} could not be decoded: {e.reason or e}") from None


class BodyLimit:
    """ASGI middleware: 413 for request bodies over max_bytes."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, self._message(int(length)))
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, self._message(seen, streamed=True))
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except ApiError as e:            # raised inside a body read, outside any route handler
            if started:
                raise
            await _send_json(send, e.status, e.message)

    def _message(self, n: int, streamed: bool = False) -> str:
        size = f"{n}+ bytes were received" if streamed else f"it is {n} bytes"
        return (f"request body over the upload limit of {self.max_bytes} bytes ({size}): "
                "send fewer or smaller images per request")


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

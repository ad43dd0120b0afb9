"""Request limits and image checks for the HTTP service; every failure is an ApiError (4xx).

* BodyLimit: an ASGI middleware refusing bodies over `max_bytes`, by Content-Length before
  reading, and by counting while streaming (chunked uploads carry no length); and a body
  deadline: a client that has not sent its whole body within `body_timeout_s` gets a 408
  (slow-loris uploads, one byte a second, would otherwise hold a connection forever).
* sniff(): the image type from the first bytes; the file name and declared type are not
  trusted (a .jpg may be a PNG, a .png may be an executable).
* pixel limits, read from the headers before any pixel is decoded (decompression bombs: a
  50 kB PNG can inflate to gigabytes): per image (`max_pixels`) and per request, summed over
  its files (`max_request_pixels`, what bounds a request's decode CPU time).
* error messages are plain sentences: never a Python bytes literal or object repr.
"""
from __future__ import annotations

import asyncio
import io
import json
import re

import numpy as np

# (magic prefix, offset, type); WEBP is RIFF....WEBP, PNM is P1..P6 then whitespace.
_SIGNATURES = [(b"\xff\xd8\xff", 0, "jpeg"), (b"\x89PNG\r\n\x1a\n", 0, "png"), (b"GIF87a", 0, "gif"),
               (b"GIF89a", 0, "gif"), (b"II*\x00", 0, "tiff"), (b"MM\x00*", 0, "tiff"),
               (b"WEBP", 8, "webp"), (b"BM", 0, "bmp")]
KNOWN_TYPES = "JPEG, PNG, GIF, TIFF, WebP, BMP or PNM"
# b'..' / b".." literals and <... object at 0x..> reprs that library messages may carry
_BYTES_REPR = re.compile(r"""\bb(['"])(?:\\.|(?!\1).)*\1""")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class ApiError(Exception):
    """A bad request: HTTP status + a message saying what was wrong and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def plain(text: str) -> str:
    """`text` without bytes literals or object reprs (they come from library exceptions)."""
    return _OBJECT_REPR.sub("the upload", _BYTES_REPR.sub("(binary data)", str(text)))


def error_body(status: int, message: str) -> dict:
    return {"error": plain(message), "status": status}


def sniff(data: bytes) -> str | None:
    """'jpeg' | 'png' | 'gif' | 'tiff' | 'webp' | 'bmp' | 'pnm', or None if no image signature."""
    for magic, offset, kind in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (kind != "webp" or data[:4] == b"RIFF"):
            return kind
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    return None


def check_image(data: bytes, name: str, max_pixels: int, draft: int | None = None) -> int:
    """Sniff the type and read the size from the header only; returns the number of pixels
    the decode will produce (a JPEG drafted to >= `draft` pixels a side decodes fewer than it
    declares); raises ApiError."""
    from PIL import Image

    if not data:
        raise ApiError(400, f"file {name!r} is empty (0 bytes)")
    kind = sniff(data)
    if kind is None:
        raise ApiError(415, f"file {name!r} is not a supported image: its first bytes match no image "
                            f"signature (the name and declared type are not trusted); send {KNOWN_TYPES} data")
    try:
        with Image.open(io.BytesIO(data)) as im:       # lazy: header only, no pixels yet
            w, h = im.size
            if w * h <= max_pixels and draft and im.format == "JPEG":
                im.draft(None, (draft, draft))          # what decode_image will do: sets the size only
            decoded = im.size[0] * im.size[1]
    except Image.DecompressionBombError:
        raise ApiError(413, f"file {name!r} declares more pixels than the limit of {max_pixels} "
                            "(max_pixels, --max-pixels)") from None
    except Exception as e:  # noqa: BLE001 — any header failure is the client's file
        raise ApiError(422, f"file {name!r} looks like {kind.upper()} but its header is unreadable "
                            f"({plain(e)})") from None
    if w * h > max_pixels:
        raise ApiError(413, f"file {name!r} is {w}x{h} = {w * h} pixels, over the per-image limit of "
                            f"{max_pixels} (max_pixels, --max-pixels; decompression-bomb guard): "
                            "send a smaller image")
    return decoded


def decode_files(prep, files: list[tuple[str, bytes]], max_request_pixels: int) -> list[np.ndarray]:
    """[(name, bytes)] -> [(H, W, C) uint8 at the model's size] (prep: infer.Preprocess).

    Every header is checked, and the pixels summed, before the first pixel is decoded, so an
    over-limit request costs header reads only; a large JPEG decodes at reduced scale."""
    from resforge.data.images import ImageError

    draft = 2 * max(prep.height, prep.width)
    total = sum(check_image(data, name, prep.max_pixels, draft) for name, data in files)
    if total > max_request_pixels:
        raise ApiError(413, f"the {len(files)} images of this request decode to {total} pixels, over the "
                            f"per-request limit of {max_request_pixels} (max_request_pixels, "
                            "--max-request-pixels): send fewer or smaller images per request")
    out = []
    for name, data in files:
        try:
            out.append(prep.decode(data, draft=True))
        except ImageError as e:
            raise ApiError(422, f"file {name!r} could not be decoded: {plain(e.reason or e)}") from None
    return out


class BodyLimit:
    """ASGI middleware: 413 for request bodies over max_bytes, 408 for bodies not received
    within body_timeout_s of the request's headers."""

    def __init__(self, app, max_bytes: int, body_timeout_s: float | None = None):
        self.app, self.max_bytes = app, int(max_bytes)
        self.body_timeout = float(body_timeout_s) if body_timeout_s else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, self._message(int(length)))
        seen, started, body_done = 0, False, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout if self.body_timeout else None

        async def counting_receive():
            nonlocal seen, body_done
            if body_done or deadline is None:       # after the body: waiting for a disconnect is fine
                msg = await receive()
            else:
                try:
                    msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                except asyncio.TimeoutError:
                    raise ApiError(408, f"request body not received within {self.body_timeout:g} s "
                                        f"({seen} bytes arrived; body_timeout_s, --body-timeout-s): "
                                        "send the whole upload at once") from None
            body_done = body_done or not msg.get("more_body", False)
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
        return (f"request body over the upload limit of {self.max_bytes} bytes ({size}; max_upload_bytes, "
                "--max-upload-mb): send fewer or smaller images per request")


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()     # connection: close, the body is unread
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

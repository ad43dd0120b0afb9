"""Decode one image file into a uint8 (H, W, C) array, whatever its mode, and resize it.

Conventions (documented once, used everywhere in resforge.data):
* EXIF orientation is applied, so the array is the image as a viewer shows it.
* Alpha is composited onto black (out = colour * alpha / 255), then dropped; transparent
  pixels of icons and cut-outs therefore read as black, never as their hidden colour.
* 16-bit and 32-bit integer modes ("I;16", "I;16B", "I;16L", "I") are scaled from the full
  16-bit range 0..65535 to 0..255 (v / 257), never clipped; "I" values outside 0..65535
  (true 32-bit data) are min-max normalised instead. Float mode "F" is read as 0..1 when its
  values lie there, otherwise min-max normalised.
* channels=1 is ITU-R 601-2 luminance (same weights as PIL's convert("L")); channels=3 is RGB;
  channels=None keeps 1 for grayscale modes (1, L, LA, I*, F) and 3 for everything else.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .paths import not_regular_reason

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".jfif"}
)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit (~ 0.25 GiB of RGBA)
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
RESIZE_MODES = ("shorter-center-crop", "stretch")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what PIL uses for RGB -> L


class ImageError(ValueError):
    """An image file that cannot be used: names the file and what is wrong with it."""

    def __init__(self, path, reason: str = ""):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}" if reason else str(path))

    def __reduce__(self):  # keep (path, reason) through pickling (process pools)
        return (type(self), (self.path, self.reason))


def decode_image(src, channels: int | None = None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> np.ndarray:
    """Path or bytes -> uint8 (H, W, C) with C = channels (or 1/3 chosen by mode).

    draft: JPEG only, let the decoder scale down by 2, 4 or 8 (DCT scaling: far less CPU and
    memory) while both sides stay >= draft pixels; other formats decode at full size."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    name = "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)
    im = _open(src, name)
    try:
        _check_pixels(im, name, max_pixels)
        if draft and im.format == "JPEG":
            im.draft(None, (int(draft), int(draft)))
        arr = _mode_to_uint8(_load_upright(im, name), name)   # (H, W, 1..4)
    finally:
        im.close()  # multi-frame files (GIF, TIFF) keep their file open until closed
    return convert_channels(_composite_alpha(arr), channels)


def probe_image(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[tuple[int, int], bool]:
    """Header-only look: ((H, W) after EXIF rotation, is_grayscale). Cheap: no pixel decode."""
    name = str(path)
    im = _open(path, name)
    try:
        _check_pixels(im, name, max_pixels)
        w, h = im.size
        if _exif_orientation(im) in (5, 6, 7, 8):  # 90/270-degree rotations swap the axes
            w, h = h, w
        return (h, w), im.mode in GRAY_MODES
    finally:
        im.close()


def verify_image(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[tuple[int, int], bool]:
    """probe_image's answer after a full decode of the pixel data, which is then dropped, so a
    truncated or corrupt file fails now. JPEGs decode at 1/8 scale (libjpeg's DCT scaling still
    reads every coded block, so truncation is still found) to keep the check cheap."""
    name = str(path)
    im = _open(path, name)
    try:
        _check_pixels(im, name, max_pixels)
        w, h = im.size
        if _exif_orientation(im) in (5, 6, 7, 8):
            w, h = h, w
        gray = im.mode in GRAY_MODES
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        _mode_to_uint8(_load_upright(im, name), name)   # what decode_image does, result dropped
        return (h, w), gray
    finally:
        im.close()


def _open(src, name: str) -> Image.Image:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(name, "empty data (0 bytes)")
        fp = io.BytesIO(src)
    else:
        if not os.path.lexists(src):
            raise ImageError(name, "file not found")
        reason = not_regular_reason(src)     # never open a FIFO / device: it can block forever
        if reason is not None:
            raise ImageError(name, reason)
        if os.path.getsize(src) == 0:
            raise ImageError(name, "empty file (0 bytes): re-copy or delete it")
        fp = Path(src)
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError(name, "not an image PIL can read (wrong extension or corrupt header)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"unreadable image header ({e})") from None


def _check_pixels(im: Image.Image, name: str, max_pixels: int) -> None:
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(name, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                               "(decompression-bomb guard); raise max_pixels if the file is trusted")
    if w == 0 or h == 0:
        raise ImageError(name, f"image has zero size {w}x{h}")


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not hide a readable image
        return 1


def _load_upright(im: Image.Image, name: str) -> Image.Image:
    try:
        im.load()  # decode pixels now: truncated/corrupt data fails here
        upright = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(name, f"corrupt or truncated image data ({e})") from None
    return upright if upright is not None else im


def _mode_to_uint8(im: Image.Image, name: str) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, C) with C in {1: L, 2: LA, 3: RGB, 4: RGBA}."""
    mode = im.mode
    if mode.startswith("I"):                       # "I", "I;16", "I;16B", "I;16L", ...
        return _scale_int(np.asarray(im))[..., None]
    if mode == "F":
        return _scale_float(np.asarray(im, dtype=np.float64))[..., None]
    if mode in ("L", "LA", "RGB", "RGBA"):
        return _hwc(np.asarray(im))
    if mode == "1":
        return _hwc(np.asarray(im.convert("L")))
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in im.info
        return _hwc(np.asarray(im.convert("RGBA" if transparent else "RGB")))
    target = {"La": "LA", "RGBa": "RGBA"}.get(mode) or ("RGBA" if "A" in im.getbands() else "RGB")
    try:  # CMYK, YCbCr, LAB, HSV, premultiplied alpha ...
        return _hwc(np.asarray(im.convert(target)))
    except (ValueError, OSError) as e:
        raise ImageError(name, f"unsupported image mode {mode!r} ({e})") from None


def _hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def _scale_int(a: np.ndarray) -> np.ndarray:
    if a.min() >= 0 and a.max() <= 65535:         # 16-bit data: full range -> 0..255
        out = a.astype(np.uint32)                 # exact: 65535 * 255 + 32767 < 2**32, half of int64
        out *= 255
        out += 32767
        out //= 65535
        return out.astype(np.uint8)
    return _minmax(a.astype(np.float64))


# _scale_float and _minmax take a fresh float64 array and compute in it, in place: the same
# values as out-of-place arithmetic, without two more 8-byte-a-pixel temporaries.
def _scale_float(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a, copy=False)
    if a.min() >= 0.0 and a.max() <= 1.0:
        a *= 255.0
        return np.round(a, out=a).astype(np.uint8)
    return _minmax(a)


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    return np.round(a, out=a).astype(np.uint8)


def _composite_alpha(a: np.ndarray) -> np.ndarray:
    """(H, W, 2|4) -> (H, W, 1|3) onto black; (H, W, 1|3) unchanged."""
    if a.shape[-1] not in (2, 4):
        return a
    # uint16 is exact (255 * 255 + 127 < 65536) and needs half the memory of uint32 temporaries
    out = a[..., :-1].astype(np.uint16)
    out *= a[..., -1:]
    out += 127
    out //= 255
    return out.astype(np.uint8)


def convert_channels(a: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 (H, W, 1|3) -> (H, W, channels); None keeps the input's count."""
    c = a.shape[-1]
    if channels is None or channels == c:
        return np.ascontiguousarray(a)
    if channels == 3 and c == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=-1))
    if channels == 1 and c == 3:
        luma = a.astype(np.float32) @ _LUMA.astype(np.float32)      # (H, W)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {c} channels to {channels}; expected 1 or 3")


def resize_image(arr: np.ndarray, size: tuple[int, int],
                 mode: str = "shorter-center-crop") -> np.ndarray:
    """uint8 (H, W, C) -> (size[0], size[1], C) with PIL's antialiased bilinear filter.

    "shorter-center-crop": scale so the image covers the target, keep the centred crop
    (aspect ratio kept); "stretch": scale each axis independently.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    th, tw = int(size[0]), int(size[1])
    h, w, c = arr.shape
    if (h, w) == (th, tw):
        return arr
    if c not in (1, 3):
        raise ValueError(f"resize_image expects 1 or 3 channels, got {c}")
    box = (0.0, 0.0, float(w), float(h))
    if mode == "shorter-center-crop":
        box = _centre_box(h, w, th / tw)
    im = Image.fromarray(arr[..., 0] if c == 1 else arr)
    out = np.asarray(im.resize((tw, th), Image.Resampling.BILINEAR, box=box))
    return _hwc(out)


def _centre_box(h: int, w: int, target_ratio: float) -> tuple[float, float, float, float]:
    """Largest centred box of height/width = target_ratio inside (h, w), in source pixels."""
    if h / w > target_ratio:           # too tall: crop rows
        ch = w * target_ratio
        top = (h - ch) / 2
        return (0.0, top, float(w), top + ch)
    cw = h / target_ratio               # too wide: crop columns
    left = (w - cw) / 2
    return (left, 0.0, left + cw, float(h))

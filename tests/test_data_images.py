"""decode_image / probe_image / resize_image: every PIL mode, EXIF, broken files, bombs."""
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from resforge.data.images import (IMAGE_EXTENSIONS, ImageError, decode_image, probe_image,
                                  resize_image)


def save(tmp_path, im, name, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_rgb_png_roundtrip_and_bytes_input(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = save(tmp_path, Image.fromarray(arr), "rgb.png")
    assert np.array_equal(decode_image(path), arr)
    assert np.array_equal(decode_image(path.read_bytes()), arr)
    assert decode_image(path, channels=3).dtype == np.uint8


def test_mode_1_becomes_0_or_255(tmp_path):
    im = Image.new("1", (5, 4))
    im.putpixel((1, 2), 1)
    out = decode_image(save(tmp_path, im, "bw.png"))
    assert out.shape == (4, 5, 1)
    assert out[2, 1, 0] == 255 and out.sum() == 255


def test_l_keeps_one_channel_and_expands_to_rgb(tmp_path):
    arr = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    path = save(tmp_path, Image.fromarray(arr), "l.png")
    assert np.array_equal(decode_image(path)[..., 0], arr)
    rgb = decode_image(path, channels=3)
    assert rgb.shape == (4, 5, 3) and np.array_equal(rgb[..., 2], arr)


def test_la_alpha_composited_on_black(tmp_path):
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (200, 128))
    im.putpixel((1, 0), (200, 255))
    out = decode_image(save(tmp_path, im, "la.png"))
    assert out.shape == (1, 2, 1)
    assert out[0, 0, 0] == 100 and out[0, 1, 0] == 200   # 200 * 128 / 255 = 100.4


def test_rgba_alpha_composited_on_black(tmp_path):
    im = Image.new("RGBA", (2, 1), (255, 100, 50, 0))
    im.putpixel((1, 0), (255, 100, 50, 255))
    out = decode_image(save(tmp_path, im, "rgba.png"))
    assert out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 100, 50]


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    im.putdata([1, 2, 1])
    plain = decode_image(save(tmp_path, im, "p.png"))
    assert plain.shape == (1, 3, 3) and plain[0, 1].tolist() == [0, 0, 255]
    trans = decode_image(save(tmp_path, im, "pt.png", transparency=1))
    assert trans[0, 0].tolist() == [0, 0, 0] and trans[0, 1].tolist() == [0, 0, 255]


def test_cmyk_converted_to_rgb(tmp_path):
    im = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 0))
    path = save(tmp_path, im, "cmyk.tif")
    assert Image.open(path).mode == "CMYK"
    out = decode_image(path)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 255, 255]


def sixteen_bit_values():
    return np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)


@pytest.mark.parametrize("mode,fmt", [("I;16", "png"), ("I;16B", "tif")])
def test_16bit_scaled_by_full_range_not_clipped(tmp_path, mode, fmt):
    v = sixteen_bit_values()
    im = Image.frombytes(mode, (4, 1), v.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    path = save(tmp_path, im, f"x16.{fmt}")
    assert Image.open(path).mode == mode
    out = decode_image(path)
    assert out.shape == (1, 4, 1) and out[0, :, 0].tolist() == [0, 100, 128, 255]
    assert decode_image(path, channels=3).shape == (1, 4, 3)


def test_mode_i_16bit_range_and_wide_range(tmp_path):
    path = save(tmp_path, Image.fromarray(sixteen_bit_values().astype(np.int32)), "i.tif")
    assert Image.open(path).mode == "I"
    assert decode_image(path)[0, :, 0].tolist() == [0, 100, 128, 255]
    wide = np.array([[-1000, 0, 99000]], dtype=np.int32)   # not 16-bit data: min-max normalised
    out = decode_image(save(tmp_path, Image.fromarray(wide), "iw.tif"))
    assert out[0, :, 0].tolist() == [0, 3, 255]


def test_mode_f_unit_range_and_arbitrary_range(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = save(tmp_path, Image.fromarray(unit), "f.tif")
    assert Image.open(path).mode == "F"
    assert decode_image(path)[0, :, 0].tolist() == [0, 128, 255]
    wide = np.array([[10.0, 35.0, 110.0]], dtype=np.float32)
    assert decode_image(save(tmp_path, Image.fromarray(wide), "fw.tif"))[0, :, 0].tolist() == [0, 64, 255]


def test_rgb_to_one_channel_is_pil_luminance(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    path = save(tmp_path, Image.fromarray(arr), "c.png")
    ours = decode_image(path, channels=1)[..., 0].astype(int)
    pil = np.asarray(Image.fromarray(arr).convert("L")).astype(int)
    assert ours.shape == (6, 6) and np.abs(ours - pil).max() <= 1


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)      # H=4, W=6
    arr[0, 0] = 255                           # a white top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6                          # "rotate 90 CW to display"
    path = save(tmp_path, Image.fromarray(arr), "rot.jpg", exif=exif.tobytes(), quality=100)
    out = decode_image(path)
    assert out.shape == (6, 4, 3)
    assert out[0, -1].mean() > 200           # top-left moved to top-right
    assert probe_image(path) == ((6, 4), False)


@pytest.mark.parametrize("name,content,needle", [
    ("empty.jpg", b"", "empty"),
    ("text.png", b"hello, I am not an image\n" * 10, "not an image"),
    ("noise.jpg", bytes(range(256)) * 4, "not an image"),
])
def test_broken_files_raise_image_error_naming_file(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=needle) as err:
        decode_image(path)
    assert name in str(err.value) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_file_rejected(tmp_path, fmt):
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = save(tmp_path, Image.fromarray(arr), f"good.{fmt}")
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="cut"):
        decode_image(cut)


def fake_png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) \
        + chunk(b"IEND", b"")


def test_decompression_bomb_guard(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(fake_png_header(100_000, 100_000))        # 10 G pixels, 100 bytes on disk
    with pytest.raises(ImageError, match="bomb"):
        decode_image(bomb)
    small = save(tmp_path, Image.new("L", (20, 20)), "s.png")
    with pytest.raises(ImageError, match="limit of 100"):
        decode_image(small, max_pixels=100)


def test_image_error_pickles_with_path_and_reason():
    e = pickle.loads(pickle.dumps(ImageError("/x/a.png", "broken")))
    assert (e.path, e.reason, str(e)) == ("/x/a.png", "broken", "/x/a.png: broken")


def test_extensions_set():
    assert {".jpg", ".png", ".tif", ".bmp", ".webp"} <= IMAGE_EXTENSIONS


def test_resize_stretch_and_centre_crop():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255                                  # white middle third, black sides
    crop = resize_image(arr, (5, 5))                     # shorter side -> 5, keep the centre
    assert crop.shape == (5, 5, 3) and crop.min() > 200      # the black sides are cropped away
    stretch = resize_image(arr, (5, 5), mode="stretch")
    assert stretch.shape == (5, 5, 3) and stretch[:, 0].max() < 100 and stretch[:, 2].min() > 200
    assert resize_image(arr[..., :1], (4, 8)).shape == (4, 8, 1)
    assert resize_image(arr, (10, 30)) is arr
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(arr, (5, 5), mode="squash")

"""The decode policy on a bad-image corpus built here: each case converted by the rule or a named failure."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from stages.imaging import Preprocess, SampleError, centre_view, decode, find_image

PP = Preprocess(size=16, crop_fraction=1.0)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width x height`` (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _jpeg(size=(32, 24)) -> bytes:
    rng = np.random.default_rng(0)
    return _save(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG", quality=90)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_image"),
    (bytes(range(256)) * 4, "corrupt_image"),
    (_jpeg()[:300], "corrupt_image"),                       # truncated JPEG: never "loaded anyway"
    (_png_header_only(20000, 20000), "too_many_pixels"),    # bomb beyond Pillow's error limit
    (_png_header_only(10000, 10000), "too_many_pixels"),    # inside Pillow's warning-only band
    (_save(Image.new("RGB", (4, 4)), "TIFF"), "format_not_allowed"),
])
def test_bad_images_are_named_failures(data, reason):
    with pytest.raises(SampleError) as info:
        decode(data)
    assert info.value.reason == reason


def test_sixteen_bit_grey_is_scaled_not_clamped():
    img = Image.fromarray(np.full((2, 2), 1000, dtype=np.uint16))
    rgb = np.asarray(decode(_save(img, "PNG")))
    assert rgb.shape == (2, 2, 3) and rgb.max() == 4  # 1000 * 255 / 65535 = 3.9, not 255
    top = np.asarray(decode(_save(Image.fromarray(np.full((1, 1), 65535, dtype=np.uint16)), "PNG")))
    assert top.min() == 255


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    assert np.asarray(decode(_save(rgba, "PNG"))).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    la = Image.new("LA", (1, 1), (0, 0))
    assert np.asarray(decode(_save(la, "PNG"))).tolist() == [[[255, 255, 255]]]


def test_palette_with_transparency_is_composited():
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    data = _save(pal, "PNG", transparency=1)
    assert np.asarray(decode(data)).tolist() == [[[0, 0, 255], [255, 255, 255]]]


def test_cmyk_and_one_bit_convert():
    cmyk = decode(_save(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[1, 1, 0] > 200 and np.asarray(cmyk)[1, 1, 1] < 60
    one = decode(_save(Image.new("1", (2, 2), 1), "PNG"))
    assert np.asarray(one).min() == 255


def test_exif_orientation_six_is_applied():
    img = Image.new("RGB", (4, 2), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(_save(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (2, 4)


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("P", (2, 2), i) for i in range(2)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode(data))[0, 0].tolist() == [255, 0, 0]


def test_png_bytes_in_a_jpg_member_decode_by_content():
    png = _save(Image.new("RGB", (3, 3), (1, 2, 3)), "PNG")
    assert np.asarray(decode(find_image({"jpg": png})))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("size", [(1, 1), (1, 100000), (100000, 1)])
def test_tiny_and_extreme_aspect_images_render_in_bounded_memory(size):
    data = _save(Image.new("L", size, 128), "PNG")
    view = centre_view(data, PP)
    assert view.shape == (16, 16, 3) and view.dtype == np.uint8


def test_sample_without_image_member_is_named():
    with pytest.raises(SampleError) as info:
        find_image({"cls": b"1", "json": b"{}"})
    assert info.value.reason == "missing_image"

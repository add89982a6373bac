"""The one image decode and preprocessing policy, shared by teacher, logits, student and evaluation.

Policy (documented in docs/images.md, identical wherever pixels are made):
- Formats are recognised from the bytes, not the member's extension; allowed: JPEG, PNG, WEBP, GIF, BMP.
- Truncated or corrupt files fail (``corrupt_image``); they are never "loaded anyway".
- An image over ``max_pixels`` fails (``too_many_pixels``) before its pixels are decoded (bombs).
- EXIF orientation is applied. Alpha (RGBA, LA, palette with transparency) is composited over white.
- 16-bit and 32-bit integer images are scaled to 8 bits (value * 255 / 65535), never clamped.
- Animated images use their first frame. CMYK is converted with Pillow's CMYK->RGB rule.
- Geometry: a crop box in original pixel coordinates (floats) resized to ``size x size``; the centre view
  is "resize the shorter side to size / crop_fraction, centre-crop size", computed as one box so memory
  never grows with extreme aspect ratios.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
DEFAULT_MAX_PIXELS = 40_000_000
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class SampleError(Exception):
    """A sample that cannot be turned into pixels; ``reason`` is the counted failure name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Preprocess:
    """How the teacher (and the student) see an image. Stored in the teacher card and logits metadata."""

    size: int = 224
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    policy_version: int = 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        data = dict(data)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


def find_image(fields: dict[str, bytes]) -> bytes:
    """The image bytes of a sample (first allowed extension present), or ``SampleError('missing_image')``."""
    for ext in IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    raise SampleError("missing_image", f"no image member (looked for {', '.join(IMAGE_EXTENSIONS)})")


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image by the policy above; raise ``SampleError``."""
    if not data:
        raise SampleError("empty_image", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_header(img, max_pixels)
            img.load()
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("too_many_pixels", str(exc)) from None
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise SampleError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return to_rgb(img)


def check_header(img: Image.Image, max_pixels: int) -> None:
    """Refuse a format outside the allowlist, an empty size, or more pixels than ``max_pixels`` (before decoding)."""
    if img.format not in ALLOWED_FORMATS:
        raise SampleError("format_not_allowed", f"format {img.format} is not in {ALLOWED_FORMATS}")
    width, height = img.size
    if width < 1 or height < 1:
        raise SampleError("corrupt_image", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise SampleError("too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels")


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation, scale high bit depths, composite alpha over white; return RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise SampleError("unsupported_mode", "floating-point images are not supported")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def centre_box(width: int, height: int, pp: Preprocess) -> tuple[float, float, float, float]:
    """The centre view's crop box in original pixels: shorter side resized to size/crop_fraction."""
    side = min(width, height) * pp.crop_fraction
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return (left, top, left + side, top + side)


def render(img: Image.Image, box: tuple[float, float, float, float], pp: Preprocess,
           flip: bool = False) -> np.ndarray:
    """Resize ``box`` of ``img`` to ``size x size`` (optionally mirrored); return HWC uint8."""
    out = img.resize((pp.size, pp.size), resample=_RESAMPLE[pp.interpolation], box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def normalise(batch_uint8, pp: Preprocess):
    """Turn an NHWC uint8 torch tensor into normalised NCHW float32 (on the tensor's device)."""
    import torch

    mean = torch.tensor(pp.mean, device=batch_uint8.device).view(1, -1, 1, 1)
    std = torch.tensor(pp.std, device=batch_uint8.device).view(1, -1, 1, 1)
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def centre_view(data: bytes, pp: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes and render the centre view as HWC uint8 (raises ``SampleError``)."""
    img = decode(data, max_pixels)
    return render(img, centre_box(*img.size, pp), pp)

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"))


def sniff_extension(data: bytes) -> str | None:
    """The image extension implied by the bytes' signature (JPEG, PNG, GIF, BMP, WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return None

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
  never grows with extreme aspect ratios (``crop_mode`` ``box``, kdpipe's own policy).
- Imported teachers see images exactly the way their library's eval transform does (``crop_mode``):
  ``center`` resizes the shorter side to ``resize`` (longer side ``int(resize * long / short)``) and centre-crops
  ``size`` (torchvision ``Resize`` + ``CenterCrop``: timm, open_clip; offsets rounded half-to-even, or floored
  with ``crop_offset`` ``floor``: Hugging Face processors); ``squash`` resizes to ``resize x resize`` (aspect ratio
  not kept) then centre-crops. With ``backend`` ``pil`` these are Pillow's own steps (same pixels as the library),
  except for an aspect ratio over 16 where only the crop's box is resized (memory bounded; pixels within one
  level: Pillow may order its two 1-D passes differently); ``backend`` ``torchvision`` resizes the whole image
  as a uint8 tensor with antialiasing (Hugging Face's torchvision image processors).
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
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
INTERPOLATIONS = tuple(_RESAMPLE)
CROP_MODES = ("box", "center", "squash")
CROP_OFFSETS = ("round", "floor")
BACKENDS = ("pil", "torchvision")
_LIBRARY_FIELDS = ("crop_mode", "resize", "crop_offset", "backend")  # recorded only when crop_mode is not "box"


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
    crop_mode: str = "box"
    resize: int | None = None     # center/squash: the resized shorter side (squash: both sides) before the crop
    crop_offset: str = "round"    # center/squash: crop offsets rounded half-to-even (torchvision) or floored (HF)
    backend: str = "pil"          # center/squash: Pillow resize of a box, or a torchvision tensor resize

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r}: one of {', '.join(CROP_MODES)}")
        if self.crop_mode != "box" and (self.resize is None or self.resize < self.size):
            raise ValueError(f"crop_mode {self.crop_mode!r} needs resize >= size ({self.resize} < {self.size})")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r}: one of {', '.join(INTERPOLATIONS)}")

    def to_dict(self) -> dict:
        """Plain JSON; a ``box`` policy gives exactly the keys of policy 1 (cards and fingerprints unchanged)."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        if self.crop_mode == "box":
            for name in _LIBRARY_FIELDS:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        data = dict(data)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


DIGITS = Preprocess(size=28, crop_fraction=1.0)  # the bundled digits at 28 px: smallcnn's (and the trainer's) default


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


def resized_size(width: int, height: int, pp: Preprocess) -> tuple[int, int]:
    """The whole image's size after the library resize of ``center`` / ``squash`` (torchvision's rule)."""
    if pp.crop_mode == "squash":
        return pp.resize, pp.resize
    if width <= height:
        return pp.resize, int(pp.resize * height / width)
    return int(pp.resize * width / height), pp.resize


def _offset(extra: int, pp: Preprocess) -> int:
    return extra // 2 if pp.crop_offset == "floor" else int(round(extra / 2.0))


def library_view(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """The ``center`` / ``squash`` view: the library's resize of the whole image, then its centre crop (HWC)."""
    width, height = img.size
    new_w, new_h = resized_size(width, height, pp)
    left, top = _offset(new_w - pp.size, pp), _offset(new_h - pp.size, pp)
    if pp.backend == "torchvision":
        return _torchvision_view(img, (new_w, new_h), (left, top), pp)
    if (new_w, new_h) == (width, height):  # torchvision's Resize returns the image unchanged
        return np.asarray(img.crop((left, top, left + pp.size, top + pp.size)), dtype=np.uint8)
    resample = _RESAMPLE[pp.interpolation]
    if new_w * new_h <= max(16 * pp.resize * pp.resize, width * height):  # the library's own steps, exactly
        resized = img.resize((new_w, new_h), resample=resample)
        return np.asarray(resized.crop((left, top, left + pp.size, top + pp.size)), dtype=np.uint8)
    # an extreme aspect ratio: resize only the crop's box (two 1-D passes; pixels within 1 level of the above)
    sx, sy = width / new_w, height / new_h
    rows = img.resize((pp.size, height), resample=resample, box=(left * sx, 0, (left + pp.size) * sx, height))
    out = rows.resize((pp.size, pp.size), resample=resample, box=(0, top * sy, pp.size, (top + pp.size) * sy))
    return np.asarray(out, dtype=np.uint8)


def _torchvision_view(img: Image.Image, new_size: tuple[int, int], offset: tuple[int, int],
                      pp: Preprocess) -> np.ndarray:
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    mode = InterpolationMode(pp.interpolation)
    chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    if new_size != img.size:
        chw = tvf.resize(chw, [new_size[1], new_size[0]], interpolation=mode, antialias=True)
    left, top = offset
    return chw[:, top:top + pp.size, left:left + pp.size].permute(1, 2, 0).contiguous().numpy()


def centre_pixels(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """The centre view of a decoded image as HWC uint8, by the preprocessing's crop mode."""
    if pp.crop_mode == "box":
        return render(img, centre_box(*img.size, pp), pp)
    return library_view(img, pp)


def normalise(batch_uint8, pp: Preprocess):
    """Turn an NHWC uint8 torch tensor into normalised NCHW float32 (on the tensor's device)."""
    import torch

    mean = torch.tensor(pp.mean, device=batch_uint8.device).view(1, -1, 1, 1)
    std = torch.tensor(pp.std, device=batch_uint8.device).view(1, -1, 1, 1)
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def centre_view(data: bytes, pp: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes and render the centre view as HWC uint8 (raises ``SampleError``)."""
    return centre_pixels(decode(data, max_pixels), pp)


def centre_views(data: bytes, pps: tuple[Preprocess, ...], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple:
    """Decode once, render the centre view of each preprocessing (an ensemble's members)."""
    img = decode(data, max_pixels)
    return tuple(centre_pixels(img, pp) for pp in pps)

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

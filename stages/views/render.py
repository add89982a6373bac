"""Consistent teaching: recorded, seeded augmented views that the teacher and the student render identically.

The logits stage stores V views per image (one row per (key, view)); the student later replays exactly one
stored view per epoch and trains against that view's targets. Three rules make this exact:

- A view's parameters come from a hash of (spec version, seed, key, view index), never from iteration
  order, so any worker, task, rerun or process draws the same views (``sample_views``).
- Parameters are rounded to float32 when drawn, i.e. to what the Parquet columns hold, so the stored
  numbers *are* the numbers that made the pixels (``render_view`` on stored views is bit-identical).
- Pixels come from ``stages.imaging.render`` (the one preprocessing policy); mixup mixes two uint8 views
  in float64 and rounds once to uint8 (``mix_uint8``), so the input of the model is a uint8 image that any
  device normalises the same way.

View 0 is the centre view (``imaging.centre_box``, no flip, no mixup): with V = 1 the artifact equals a
single-view one, and selection can use view 0's score. See docs/views.md.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from stages.imaging import DEFAULT_MAX_PIXELS, Preprocess, SampleError, centre_box, decode, render
from stages.views.spec import AugSpec

_RRC_ATTEMPTS = 10
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class View:
    """One view of an image: what ``render_view`` needs to make its pixels, exactly.

    Attributes:
        index: the view's number (0 = centre view).
        box: crop box (left, top, right, bottom) in original pixels, float32-exact values.
        flip: mirror the crop horizontally.
        partner: key (same shard) of the image mixed in, or None.
        lam: weight of this image in the mix (float32-exact, in [0.5, 1]); 1.0 without mixup.
    """

    index: int
    box: Box
    flip: bool = False
    partner: str | None = None
    lam: float = 1.0

    def to_json(self) -> dict:
        """JSON-safe dict (e.g. the ``views`` list of a training sample's ``json`` member)."""
        return {"view": self.index, "box": list(self.box), "flip": self.flip, "partner": self.partner,
                "lambda": self.lam}

    @classmethod
    def from_json(cls, data: dict) -> "View":
        """The view of ``to_json`` (values re-rounded to float32, which keeps them unchanged)."""
        return cls(int(data["view"]), _f32_box(data["box"]), bool(data["flip"]), data["partner"],
                   _f32(data["lambda"]))


def _f32(value: float) -> float:
    return float(np.float32(value))


def _f32_box(box: Iterable[float]) -> Box:
    return tuple(_f32(v) for v in box)  # type: ignore[return-value]


class _Stream:
    """Uniform floats in [0, 1) from sha256 in counter mode: the same on every platform and numpy version."""

    def __init__(self, *parts):
        self.base = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
        self.counter = 0

    def uniform(self) -> float:
        digest = hashlib.sha256(self.base + self.counter.to_bytes(8, "little")).digest()
        self.counter += 1
        return (int.from_bytes(digest[:8], "little") >> 11) * 2.0 ** -53

    def beta_symmetric(self, alpha: float) -> float:
        """Beta(alpha, alpha) by Johnk's rejection method in log space (exact for any alpha > 0)."""
        while True:
            lx = math.log1p(-self.uniform()) / alpha
            ly = math.log1p(-self.uniform()) / alpha
            total = max(lx, ly) + math.log1p(math.exp(-abs(lx - ly)))
            if total <= 0.0 and math.isfinite(total):
                return math.exp(lx - total)


class PartnerPool:
    """The shard's decodable keys, sorted once: the mixup partners of ``key`` are the pool without ``key``.

    ``sample_views`` accepts a pool instead of a key list, so drawing a shard's views costs O(n log n) in
    all instead of a sort per image.
    """

    def __init__(self, keys: Iterable[str]):
        self.keys = tuple(sorted(set(keys)))

    def others(self, key: str) -> Sequence[str]:
        """``sorted(keys - {key})`` as a read-only sequence (no copy)."""
        return _Without(self.keys, key)


class _Without(Sequence):
    """A sorted tuple with one key left out, indexed without copying."""

    def __init__(self, keys: tuple, key: str):
        self.keys = keys
        i = bisect.bisect_left(keys, key)
        self.gap = i if i < len(keys) and keys[i] == key else None

    def __len__(self) -> int:
        return len(self.keys) - (self.gap is not None)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.keys[i + (self.gap is not None and i >= self.gap)]


def sample_views(spec: AugSpec, key: str, width: int, height: int,
                 shard_keys: Sequence[str] | PartnerPool | None = None,
                 *, pp: Preprocess) -> list[View]:
    """The ``spec.views`` views of image ``key`` (``width x height``), independent of any iteration order.

    Args:
        shard_keys: keys of the shard's samples that have rows in the logits part (i.e. that decode);
            mixup partners are drawn from them (order does not matter; ``key`` itself is excluded).
            Required when ``spec.mixup > 0``.
        pp: the teacher's preprocessing; view 0 is its centre box.
    """
    if spec.mixup and shard_keys is None:
        raise InputError(f"{key}: mixup draws a partner within the shard; pass shard_keys")
    if not spec.mixup:
        others: Sequence[str] = []
    elif isinstance(shard_keys, PartnerPool):
        others = shard_keys.others(key)
    else:
        others = sorted(set(shard_keys or ()) - {key})
    centre = centre_box(width, height, pp)
    views = [View(0, _f32_box(centre))]
    for index in range(1, spec.views):
        views.append(_draw(spec, key, index, (width, height), centre, others))
    return views


def _draw(spec: AugSpec, key: str, index: int, size: tuple[int, int], centre: tuple,
          others: Sequence[str]) -> View:
    """View ``index`` (> 0): crop (centre box without rrc), flip, then mixup partner and lambda."""
    stream = _Stream("kdpipe-view", spec.version, spec.seed, key, index)
    width, height = size
    if spec.scale is None:
        box = centre
    else:
        box = _rrc_box(stream, width, height, spec.scale, spec.ratio)
    flip = stream.uniform() < spec.flip
    partner, lam = None, 1.0
    if spec.mixup and others:
        partner = others[min(int(stream.uniform() * len(others)), len(others) - 1)]
        draw = stream.beta_symmetric(spec.mixup)
        lam = max(draw, 1.0 - draw)
    box = tuple(min(max(_f32(v), 0.0), float(limit)) for v, limit in zip(box, (width, height) * 2))
    return View(index, box, flip, partner, _f32(lam))  # type: ignore[arg-type]


def rrc_try(uniform: Callable[[], float], width: int, height: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> Box | None:
    """torchvision's RandomResizedCrop rule with float boxes: up to 10 tries, None when none fits.

    Each try draws, from ``uniform()`` in [0, 1), the area fraction in ``scale``, the log aspect in
    ``log(ratio)``, then (if the crop fits) left and top. Shared by the stored views (``_rrc_box``) and the
    student's own views (``stages.train.augment``), which differ only in the stream and the fallback.
    """
    area = float(width * height)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_RRC_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform())
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform())
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0.0 < w <= width and 0.0 < h <= height:
            left, top = (width - w) * uniform(), (height - h) * uniform()
            return (left, top, left + w, top + h)
    return None


def _rrc_box(stream: _Stream, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> Box:
    """``rrc_try`` on the view's stream, else the ratio-clipped centre."""
    box = rrc_try(stream.uniform, width, height, scale, ratio)
    if box is not None:
        return box
    w, h = float(width), float(height)
    if w / h < ratio[0]:
        h = w / ratio[0]
    elif w / h > ratio[1]:
        w = h * ratio[1]
    left, top = (width - w) / 2.0, (height - h) / 2.0
    return (left, top, left + w, top + h)


def mix_uint8(own: np.ndarray, other: np.ndarray, lam: float) -> np.ndarray:
    """``rint(lam * own + (1 - lam) * other)`` in float64, clipped to uint8: the one rounding of mixup."""
    lam64 = float(np.float32(lam))
    mixed = np.rint(own.astype(np.float64) * lam64 + other.astype(np.float64) * (1.0 - lam64))
    return np.clip(mixed, 0, 255).astype(np.uint8)


def render_view(img: Image.Image, view: View, pp: Preprocess, partner_img: Image.Image | None = None) -> np.ndarray:
    """The pixels of ``view`` of ``img`` as HWC uint8 (bit-identical wherever it is called).

    The crop box is resized to ``pp.size`` and flipped by ``imaging.render``. With a partner, the partner's
    centre view (unflipped) is mixed in with ``mix_uint8(own, partner, view.lam)``.

    Raises:
        InputError: the view has a partner and ``partner_img`` is None.
    """
    own = render(img, view.box, pp, view.flip)
    if view.partner is None:
        return own
    if partner_img is None:
        raise InputError(f"view {view.index} mixes in {view.partner!r}: pass its image as partner_img")
    other = render(partner_img, centre_box(*partner_img.size, pp), pp)
    return mix_uint8(own, other, view.lam)


@dataclass(frozen=True)
class RenderedView:
    """One (key, view) row to be: the view and its HWC uint8 pixels."""

    key: str
    view: View
    pixels: np.ndarray


def render_shard_views(samples: Iterable[tuple[str, bytes]], spec: AugSpec, pp: Preprocess,
                       on_failure: Callable[[str, str], None],
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[RenderedView]:
    """All views of a shard's images in shard order, views 0..V-1 per key (the logits stage's loop).

    Without mixup this streams one image at a time. With mixup the shard's encoded bytes are held (memory
    bounded by the shard's size) so partners can be decoded: a first pass decodes every image to learn
    which keys decode (the partner pool), a second renders.

    Args:
        samples: ``(key, image bytes)`` in shard order.
        on_failure: called ``(reason, key)`` for an image that cannot be decoded (it gets no rows).
    """
    if not spec.mixup:
        for key, data in samples:
            img = _decode_or_fail(key, data, max_pixels, on_failure)
            if img is not None:
                yield from _render_key(key, img, spec, pp, None, None)
        return
    encoded = {}
    for key, data in samples:
        if _decode_or_fail(key, data, max_pixels, on_failure) is not None:
            encoded[key] = data
    pool = PartnerPool(encoded)
    for key, data in encoded.items():
        img = decode(data, max_pixels)
        yield from _render_key(key, img, spec, pp, pool, lambda k: decode(encoded[k], max_pixels))


def _decode_or_fail(key: str, data: bytes, max_pixels: int, on_failure) -> Image.Image | None:
    try:
        return decode(data, max_pixels)
    except SampleError as exc:
        on_failure(exc.reason, key)
        return None


def _render_key(key: str, img: Image.Image, spec: AugSpec, pp: Preprocess, shard_keys, load) -> Iterator[RenderedView]:
    for view in sample_views(spec, key, img.width, img.height, shard_keys, pp=pp):
        partner = None if view.partner is None else load(view.partner)
        yield RenderedView(key, view, render_view(img, view, pp, partner))


def epoch_view(seed: int, key: str, epoch: int, num_views: int) -> int:
    """The stored view the student uses for ``key`` in ``epoch``: every view once per V epochs.

    Epochs ``c*V .. c*V+V-1`` walk a permutation of ``range(V)`` seeded by hash(seed, key, c), so each block
    of V consecutive epochs uses every view exactly once, in a per-key order that changes between blocks.
    """
    if num_views < 1 or epoch < 0:
        raise ValueError(f"epoch_view: need num_views >= 1 and epoch >= 0, got {num_views}, {epoch}")
    cycle, slot = divmod(epoch, num_views)
    order = list(range(num_views))
    stream = _Stream("kdpipe-epoch-view", seed, key, cycle)
    for i in range(num_views - 1, 0, -1):
        j = min(int(stream.uniform() * (i + 1)), i)
        order[i], order[j] = order[j], order[i]
    return order[slot]

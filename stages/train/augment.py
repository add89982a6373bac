"""Training views: a random resized crop box and a horizontal flip, drawn from an explicit, seeded RNG.

A view is two explicit parameters, ``box`` (left, top, right, bottom in original pixels, floats) and
``flip``, rendered by ``stages.imaging.render`` exactly like the teacher's centre view. The RNG of a
sample's view is seeded by (run seed, epoch, pass, key), so a view does not depend on the rank, the
worker or the position in the stream: it can be recomputed (and a later issue can replay stored
teacher views) from the key alone. Evaluation uses ``stages.imaging.centre_box``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from stages.imaging import Preprocess, centre_box
from stages.views.render import Box, rrc_try


@dataclass(frozen=True)
class AugmentSpec:
    """Random-resized-crop and flip parameters (torchvision's RandomResizedCrop rule, 10 tries)."""

    scale_min: float = 0.6
    scale_max: float = 1.0
    ratio_min: float = 3.0 / 4.0
    ratio_max: float = 4.0 / 3.0
    flip_prob: float = 0.0

    def __post_init__(self):
        if not 0.0 < self.scale_min <= self.scale_max <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale_min}, {self.scale_max}")
        if not 0.0 < self.ratio_min <= self.ratio_max:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio_min}, {self.ratio_max}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_prob}")

    def to_dict(self) -> dict:
        return asdict(self)


def view_rng(seed: int, epoch: int, key: str, occurrence: int = 0) -> np.random.Generator:
    """The RNG of one sample's view: a function of (seed, epoch, occurrence, key) only."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed), int(epoch), int(occurrence), digest])


def random_resized_box(width: int, height: int, rng: np.random.Generator, spec: AugmentSpec) -> Box:
    """``stages.views.rrc_try`` drawn from ``rng`` (``rng.uniform(lo, hi)`` is ``lo + (hi - lo) * rng.random()``
    bit for bit, so these are exactly the boxes of drawing with ``rng.uniform``), else the whole image.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        rng: the sample's view RNG.
        spec: scale and ratio ranges.
    """
    box = rrc_try(rng.random, width, height, (spec.scale_min, spec.scale_max), (spec.ratio_min, spec.ratio_max))
    return (0.0, 0.0, float(width), float(height)) if box is None else box


def draw_view(width: int, height: int, rng: np.random.Generator, spec: AugmentSpec) -> tuple[Box, bool]:
    """One training view: (crop box, flip). The box is drawn first, then the flip, from ``rng``."""
    box = random_resized_box(width, height, rng, spec)
    flip = bool(rng.random() < spec.flip_prob)
    return box, flip


def eval_view(width: int, height: int, pp: Preprocess) -> tuple[Box, bool]:
    """The evaluation view: the teacher's centre box, never flipped."""
    return centre_box(width, height, pp), False

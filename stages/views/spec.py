"""The augmentation spec of multi-view logits: ``AugSpec`` (stored in logits metadata and the manifest's
``params.views.aug``), its validation, and the ``--aug`` CLI parser. How the views are drawn and rendered is
``stages.views``; see docs/views.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import InputError

AUG_VERSION = 1
MAX_VIEWS = 32767  # the ``view`` column is int16
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class AugSpecError(InputError):
    """An augmentation spec (CLI string or stored dict) that kdpipe cannot use; the message names the part."""


@dataclass(frozen=True)
class AugSpec:
    """How the V views of an image are drawn. Stored in logits metadata and ``params.views.aug``.

    Attributes:
        views: number of views V per image (view 0 is the centre view).
        scale: random-resized-crop area range (fraction of the image), or None for no random crop.
        ratio: random-resized-crop aspect-ratio range (width / height).
        flip: probability of a horizontal flip.
        mixup: Beta(alpha, alpha) parameter of within-shard mixup; 0 turns mixup off.
        seed: the augmentation seed (part of the hash of every view).
        version: the sampling algorithm's version; another version is refused.
    """

    views: int = 1
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = DEFAULT_RATIO
    flip: float = 0.0
    mixup: float = 0.0
    seed: int = 0
    version: int = AUG_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict:
        """A JSON-safe dict (the manifest's ``params.views.aug``)."""
        rrc = None if self.scale is None else {"scale": list(self.scale), "ratio": list(self.ratio)}
        return {"version": self.version, "views": self.views, "rrc": rrc, "flip": self.flip,
                "mixup_alpha": self.mixup, "seed": self.seed, "view0": "centre"}

    @classmethod
    def from_dict(cls, data: dict) -> "AugSpec":
        """The spec of ``to_dict``; raise ``AugSpecError`` naming an unknown or missing field."""
        known = {"version", "views", "rrc", "flip", "mixup_alpha", "seed", "view0"}
        if not isinstance(data, dict) or set(data) != known:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise AugSpecError(f"stored augmentation spec has fields {got}, expected {sorted(known)}")
        if data["view0"] != "centre":
            raise AugSpecError(f"stored augmentation spec: view0={data['view0']!r}, only 'centre' is known")
        rrc = data["rrc"]
        if rrc is not None and (not isinstance(rrc, dict) or set(rrc) != {"scale", "ratio"}):
            raise AugSpecError(f"stored augmentation spec: rrc must be null or {{scale, ratio}}, got {rrc!r}")
        return cls(views=data["views"], scale=None if rrc is None else _pair(rrc["scale"], "rrc.scale"),
                   ratio=DEFAULT_RATIO if rrc is None else _pair(rrc["ratio"], "rrc.ratio"),
                   flip=data["flip"], mixup=data["mixup_alpha"], seed=data["seed"], version=data["version"])

    def to_string(self) -> str:
        """The canonical CLI form (``parse_aug(spec.to_string(), spec.views, spec.seed) == spec``)."""
        parts = []
        if self.scale is not None:
            parts.append(f"rrc:{self.scale[0]!r}-{self.scale[1]!r}")
            if self.ratio != DEFAULT_RATIO:
                parts.append(f"ratio:{self.ratio[0]!r}-{self.ratio[1]!r}")
        if self.flip:
            parts.append(f"flip:{self.flip!r}")
        if self.mixup:
            parts.append(f"mixup:{self.mixup!r}")
        return ",".join(parts) or "none"


def _pair(value, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise AugSpecError(f"augmentation spec: {name} must be two numbers, got {value!r}")
    return (_number(value[0], name), _number(value[1], name))


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AugSpecError(f"augmentation spec: {name} must be a finite number, got {value!r}")
    return float(value)


def _validate(spec: AugSpec) -> None:
    """Raise ``AugSpecError`` naming the first field out of range."""
    if spec.version != AUG_VERSION:
        raise AugSpecError(f"augmentation spec version {spec.version!r}: this kdpipe draws version "
                           f"{AUG_VERSION}; rebuild the logits or use the kdpipe that made them")
    if isinstance(spec.views, bool) or not isinstance(spec.views, int) or not 1 <= spec.views <= MAX_VIEWS:
        raise AugSpecError(f"augmentation spec: views must be an integer in 1..{MAX_VIEWS}, got {spec.views!r}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or spec.seed < 0:
        raise AugSpecError(f"augmentation spec: seed must be a non-negative integer, got {spec.seed!r}")
    if spec.scale is not None:
        lo, hi = (_number(v, "rrc") for v in spec.scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise AugSpecError(f"augmentation spec: rrc scale {lo}-{hi} must satisfy 0 < low <= high <= 1")
    lo, hi = (_number(v, "ratio") for v in spec.ratio)
    if not 0.0 < lo <= hi:
        raise AugSpecError(f"augmentation spec: ratio {lo}-{hi} must satisfy 0 < low <= high")
    if not 0.0 <= _number(spec.flip, "flip") <= 1.0:
        raise AugSpecError(f"augmentation spec: flip probability {spec.flip} is not in [0, 1]")
    if _number(spec.mixup, "mixup") < 0.0:
        raise AugSpecError(f"augmentation spec: mixup alpha {spec.mixup} must be >= 0 (0 = off)")
    if spec.views > 1 and spec.scale is None and not spec.flip and not spec.mixup:
        raise AugSpecError(f"augmentation spec: {spec.views} views need an augmentation (rrc, flip or mixup); "
                           "with none every view would be the centre view")


def parse_aug(text: str | None, views: int = 1, seed: int = 0) -> AugSpec:
    """Parse ``--aug`` like ``"rrc:0.35-1,flip:0.5,mixup:0.2"`` (also ``ratio:0.75-1.333``, ``none``).

    Raises:
        AugSpecError: naming the bad token (unknown name, repeated name, bad number or range).
    """
    values: dict[str, str] = {}
    for token in [] if text in (None, "", "none") else str(text).split(","):
        name, sep, value = token.strip().partition(":")
        if not sep or name not in ("rrc", "ratio", "flip", "mixup"):
            raise AugSpecError(f"--aug {text!r}: bad token {token!r}; use rrc:LO-HI, ratio:LO-HI, flip:P, "
                               "mixup:ALPHA (comma-separated)")
        if name in values:
            raise AugSpecError(f"--aug {text!r}: {name!r} given twice")
        values[name] = value
    if "ratio" in values and "rrc" not in values:
        raise AugSpecError(f"--aug {text!r}: ratio needs rrc (it shapes the random resized crop)")
    return AugSpec(views=views, seed=seed, flip=_float(values.get("flip", "0"), "flip", text),
                   mixup=_float(values.get("mixup", "0"), "mixup", text),
                   scale=_range(values["rrc"], "rrc", text) if "rrc" in values else None,
                   ratio=_range(values["ratio"], "ratio", text) if "ratio" in values else DEFAULT_RATIO)


def _float(value: str, name: str, text) -> float:
    try:
        return float(value)
    except ValueError:
        raise AugSpecError(f"--aug {text!r}: {name} value {value!r} is not a number") from None


def _range(value: str, name: str, text) -> tuple[float, float]:
    lo, sep, hi = value.partition("-")
    if not sep:
        raise AugSpecError(f"--aug {text!r}: {name} needs a range LO-HI, got {value!r}")
    return (_float(lo, name, text), _float(hi, name, text))


def manifest_views(spec: AugSpec | None) -> dict:
    """The logits manifest's ``params.views``: ``{count, policy, aug}`` (``centre`` when no spec)."""
    if spec is None:
        return {"count": 1, "policy": "centre", "aug": None}
    return {"count": spec.views, "policy": "centre+aug", "aug": spec.to_dict()}

"""The check_views command's options: one place for their defaults and help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option


@dataclass(frozen=True)
class CheckViewsOptions:
    """Which rows are re-checked, against what, and how strictly."""

    sample: int = option(256, "rows to check, drawn uniformly")
    data: Path | None = option(None, "dataset manifest (default: the logits' input)", type=Path)
    teacher: Path | None = option(None, "teacher card (default: the logits' input)", type=Path)
    seed: int = option(0, "seed of the row sample")
    ulps: float = option(4.0, "tolerance in units of the stored logit dtype at the row's largest |logit| (>= 1)")
    batch_size: int = option(64, "images per forward pass")
    device: str = option("cpu", "cpu, cuda, cuda:N")

"""The dedup stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option


@dataclass(frozen=True)
class DedupOptions:
    """What counts as the same image and how the search is batched."""

    reference: Path | None = option(None, "logits manifest of images that must not leak into the pool (e.g. the "
                                          "evaluation set)", type=Path)
    threshold: float = option(0.95, "cosine similarity at or above which two images are the same")
    neighbors: int = option(32, "nearest query images examined per image")
    batch_rows: int = option(16384, "query rows per search batch")

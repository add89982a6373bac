"""The select stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option

POLICIES = ("topk", "threshold")


@dataclass(frozen=True)
class SelectOptions:
    """How pseudo-labels are chosen from the logits (besides the required ``--per-class``)."""

    policy: str = option("topk", "topk: per class the best K_l of the images whose top-P holds it (Yalniz); "
                                 "threshold: argmax label, --min-score, at most K per class (Noisy Student)",
                         choices=POLICIES)
    top_p: int | None = option(None, "topk policy: a class is a candidate of images whose top-P holds it "
                                     "(default: min(10, the stored top-K))", type=int)
    min_score: float = option(0.0, "smallest p(label|x) admitted")
    rank_temperature: float | None = option(None, "score and rank at this T instead of the logits' stored T: "
                                                  "the stored T, or 1 (needs the lse1 column, logits schema 2)",
                                            type=float)
    balance: bool = option(False, "threshold policy: duplicate rows of classes under the cap to reach it")
    soft_targets: bool = option(False, "carry topk_index, topk_logit, lse into the selection")
    exclude: Path | None = option(None, "exclusion manifest from `kdpipe dedup` (its keys are never selected)",
                                  type=Path)
    gallery: int = option(0, "images per class in the report gallery, top and last admitted (0: no gallery)")
    dataset: Path | None = option(None, "dataset manifest for the gallery (default: found through the logits' "
                                        "lineage)", type=Path)
    batch_rows: int = option(65536, "logits rows per read batch (bounds the read buffer)")

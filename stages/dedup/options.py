"""The dedup stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option

METHODS = ("flat", "ivf")
STEPS = ("all", "train", "assign", "search", "group")
QUANTIZERS = ("flat", "hnsw")


@dataclass(frozen=True)
class DedupOptions:
    """What counts as the same image, how the search is batched, and the sharded (IVF) method's settings."""

    reference: Path | None = option(None, "logits manifest of images that must not leak into the pool (e.g. the "
                                          "evaluation set)", type=Path)
    threshold: float = option(0.95, "cosine similarity at or above which two images are the same")
    neighbors: int = option(32, "nearest query images examined per image")
    batch_rows: int = option(16384, "query rows per search batch")
    method: str = option("flat", "flat: one exact index over the pool (small pools, the reference); ivf: sharded "
                                 "inverted lists as array-task steps (billion scale)", choices=METHODS)
    step: str = option("all", "ivf only: the step this task runs (all: every step in order, one task)",
                       choices=STEPS)
    lists: int = option(1024, "ivf: coarse lists (k-means centroids); ~N/1000 keeps a list's search small")
    probe: int = option(8, "ivf: nearest lists each image is searched in (its own included)")
    train_sample: int = option(65536, "ivf: embeddings sampled (seeded, whole parts) to train the quantizer")
    seed: int = option(0, "ivf: seed of the training sample and of k-means")
    list_block: int = option(64, "ivf: lists per search part (bounds a search part's memory: list_block x "
                                 "N/lists x probe rows); aim at ~10^3 search parts at scale")
    assign_block: int = option(1, "ivf: logits parts per assign part; a search part reads one row group per "
                                  "assign part, so keep (assign parts x search parts) below ~10^7")
    quantizer: str = option("flat", "ivf: how an image finds its nearest lists: flat (exact; N x lists x D, GPU) or "
                                    "hnsw (a graph over the centroids, ~N log lists; for lists >= ~10^5)",
                            choices=QUANTIZERS)
    pq: int = option(0, "ivf: product-quantizer sub-quantizers (8 bits each; must divide D); the search step holds "
                        "M-byte codes instead of 2 D-byte embeddings and re-checks candidates exactly; 0: off")
    pq_margin: float = option(0.1, "ivf with --pq: candidates are pairs at approximate (code) cosine >= threshold "
                                    "- margin, then re-checked exactly; larger: higher recall, more re-reads")

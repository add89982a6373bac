"""``kdpipe dedup --query LOGITS --reference LOGITS --out DIR``: contamination + near-duplicate exclusion list."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("dedup", help="faiss filter on teacher embeddings: eval-set contamination and "
                                     "near-duplicates -> exclusion manifest (for `select --exclude`)")
    p.add_argument("--query", required=True, type=Path, help="logits manifest of the pool (with embeddings)")
    p.add_argument("--reference", type=Path, default=None,
                   help="logits manifest of images that must not leak into the pool (e.g. the evaluation set)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity that counts as the same image")
    p.add_argument("--neighbors", type=int, default=32, help="nearest query images examined per image")
    p.add_argument("--batch-rows", type=int, default=16384, help="query rows per search batch")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline import manifest as mf
    from stages.dedup.stage import dedup

    path = dedup(args.query, args.out, reference=args.reference, threshold=args.threshold,
                 neighbors=args.neighbors, batch_rows=args.batch_rows)
    totals = mf.load(path).totals
    print(f"{path}: {totals.get('contaminated', 0)} contaminated, {totals.get('near_duplicate', 0)} near-duplicates "
          f"excluded of {totals.get('samples', 0)} query images")
    return 0

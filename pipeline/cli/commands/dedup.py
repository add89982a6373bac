"""``kdpipe dedup --query LOGITS --reference LOGITS --out DIR``: contamination + near-duplicate exclusion list."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.options import add_options, as_kwargs, from_args
from stages.dedup.options import DedupOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("dedup", help="faiss filter on teacher embeddings: eval-set contamination and "
                                     "near-duplicates -> exclusion manifest (for `select --exclude`)")
    p.add_argument("--query", required=True, type=Path, help="logits manifest of the pool (with embeddings)")
    p.add_argument("--out", required=True, type=Path)
    add_options(p, DedupOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline import manifest as mf
    from stages.dedup.stage import dedup

    path = dedup(args.query, args.out, **as_kwargs(from_args(DedupOptions, args)))
    totals = mf.load(path).totals
    print(f"{path}: {totals.get('contaminated', 0)} contaminated, {totals.get('near_duplicate', 0)} near-duplicates "
          f"excluded of {totals.get('samples', 0)} query images")
    return 0

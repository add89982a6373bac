"""``kdpipe select --logits M --per-class K --out DIR``: per-class pseudo-labels from teacher logits."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli.commands.common import add_task_args, resolve_task

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("select", help="exact per-class top-K (or threshold) pseudo-labels from logits")
    p.add_argument("--logits", required=True, type=Path, help="logits manifest")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--per-class", required=True,
                   help="K per class (the cap of --policy threshold): a number, or a CSV (class,k) / JSON file")
    p.add_argument("--top-p", type=int, default=None,
                   help="topk policy: a class is a candidate of images whose top-P holds it (default: min(10, K))")
    p.add_argument("--policy", choices=["topk", "threshold"], default="topk")
    p.add_argument("--min-score", type=float, default=0.0, help="smallest p(label|x) admitted")
    p.add_argument("--balance", action="store_true",
                   help="threshold policy: duplicate rows of classes under the cap to reach it (dup column)")
    p.add_argument("--soft-targets", action="store_true", help="carry topk_index, topk_logit, lse along")
    p.add_argument("--exclude", type=Path, default=None, help="exclusion manifest from `kdpipe dedup`")
    p.add_argument("--gallery", type=int, default=8, help="images per class in the report gallery (0: none)")
    p.add_argument("--dataset", type=Path, default=None,
                   help="dataset manifest for the gallery (default: found through the logits' lineage)")
    p.add_argument("--batch-rows", type=int, default=65536, help="logits rows per read batch")
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.artifacts.logits_reader import open_logits
    from stages.select.stage import select

    index, count = resolve_task(args)
    top_p = args.top_p if args.top_p is not None else min(10, open_logits(args.logits).topk)
    path = select(args.logits, args.out, per_class=args.per_class, policy=args.policy, top_p=top_p,
                  min_score=args.min_score, balance=args.balance, soft_targets=args.soft_targets,
                  exclude=args.exclude, task_index=index, num_tasks=count, finalize_only=args.finalize,
                  do_finalize=not args.no_finalize, batch_rows=args.batch_rows, gallery=args.gallery,
                  dataset=args.dataset, retry_failed=args.retry_failed, max_attempts=args.max_attempts)
    log.info("select: %s", path if path else "map part committed; the reduce waits for the other tasks")
    return 0

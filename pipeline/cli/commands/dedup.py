"""``kdpipe dedup --query LOGITS --reference LOGITS --out DIR``: contamination + near-duplicate exclusion list.

``--method ivf`` runs the sharded steps (``--step train|assign|search|group``, each an array job; ``all``: every
step in order in one task); the array-task flags apply to each step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli.commands.common import add_task_args, task_options
from pipeline.options import add_options, as_kwargs, from_args
from stages.dedup.options import DedupOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("dedup", help="faiss filter on teacher embeddings: eval-set contamination and "
                                     "near-duplicates -> exclusion manifest (for `select --exclude`)")
    p.add_argument("--query", required=True, type=Path, help="logits manifest of the pool (with embeddings)")
    p.add_argument("--out", required=True, type=Path)
    add_options(p, DedupOptions)
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline import manifest as mf
    from pipeline.errors import InputError
    from stages.dedup.stage import dedup

    opts, task = from_args(DedupOptions, args), task_options(args)
    kwargs = as_kwargs(opts)
    if opts.method == "ivf":
        index, count = task.resolved()
        kwargs.update(task_index=index, num_tasks=count, finalize_only=task.finalize,
                      do_finalize=not task.no_finalize, retry_failed=task.retry_failed,
                      max_attempts=task.max_attempts)
    elif opts.step != "all":
        raise InputError(f"--step {opts.step}: steps belong to --method ivf (the flat method is one step)")
    else:
        for name in ("step", "lists", "probe", "train_sample", "seed", "list_block", "assign_block", "quantizer", "pq",
                     "pq_margin"):
            kwargs.pop(name)
    path = dedup(args.query, args.out, **kwargs)
    if path is None:
        log.info("dedup %s: this task's parts are committed; the step's manifest waits for the other tasks",
                 opts.step)
        return 0
    totals = mf.load(path).totals
    print(f"{path}: {totals.get('contaminated', 0)} contaminated, {totals.get('near_duplicate', 0)} near-duplicates "
          f"excluded of {totals.get('samples', 0)} query images")
    return 0

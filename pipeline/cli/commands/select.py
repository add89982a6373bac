"""``kdpipe select --logits M --per-class K --out DIR``: per-class pseudo-labels from teacher logits."""

from __future__ import annotations

import logging

from pipeline.cli.commands.common import add_task_args, out_location, task_options
from pipeline.memory import one_arena
from pipeline.options import add_options, as_kwargs, from_args
from stages.select.options import SelectOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("select", help="exact per-class top-K (or threshold) pseudo-labels from logits")
    p.add_argument("--logits", required=True, type=out_location, help="logits manifest (a folder, or an s3:// gs:// prefix)")
    p.add_argument("--out", required=True, type=out_location, help="folder, or an s3:// or gs:// prefix")
    p.add_argument("--per-class", required=True,
                   help="K per class (the cap of --policy threshold): a number, or a CSV (class,k) / JSON file")
    add_options(p, SelectOptions)
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.select.stage import select

    opts, task = from_args(SelectOptions, args), task_options(args)
    index, count = task.resolved()
    one_arena()  # its readers' threads free into one arena, which ``release_memory`` trims between phases
    path = select(args.logits, args.out, per_class=args.per_class, **as_kwargs(opts), task_index=index,
                  num_tasks=count, finalize_only=task.finalize, do_finalize=not task.no_finalize,
                  retry_failed=task.retry_failed, max_attempts=task.max_attempts)
    log.info("select: %s", path if path else "map part committed; the reduce waits for the other tasks")
    return 0

"""``kdpipe reshard --selection M --out DIR``: selected samples -> training shards with hard and soft targets."""

from __future__ import annotations

import logging

from pipeline.cli.commands.common import add_task_args, out_location, task_options
from pipeline.options import add_options, as_kwargs, from_args
from stages.reshard.options import ReshardOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("reshard", help="write the selected samples as training shards (image, cls, soft targets)")
    p.add_argument("--selection", required=True, help="selection manifest")
    p.add_argument("--out", required=True, type=out_location, help="folder, or an s3:// or gs:// prefix")
    add_options(p, ReshardOptions)
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.reshard.stage import reshard

    task = task_options(args)
    index, count = task.resolved()
    result = reshard(args.selection, args.out, **as_kwargs(from_args(ReshardOptions, args)), task_index=index,
                     num_tasks=count, retry_failed=task.retry_failed, max_attempts=task.max_attempts,
                     do_finalize=not task.no_finalize, finalize_only=task.finalize)
    log.info("reshard: %s", result.manifest or "parts committed; manifest pending other tasks")
    return result.report.exit_code

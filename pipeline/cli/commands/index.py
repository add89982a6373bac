"""``kdpipe index SRC... --out DIR``: existing WebDataset tars, where they live -> a dataset manifest."""

from __future__ import annotations

import logging

from pipeline.cli.commands.common import add_task_args, out_location, task_options
from pipeline.options import add_options, as_kwargs, from_args
from stages.index.options import IndexOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("index", help="existing WebDataset tars (paths, globs, {a..b}, list files, URLs) -> a "
                                     "dataset manifest pointing at them in place")
    p.add_argument("src", nargs="+", help="shards: local paths, folders, globs, pool/{00000..00099}.tar patterns, "
                                          "a .txt file listing shards, s3:// gs:// http(s):// URLs")
    p.add_argument("--out", required=True, type=out_location,
                   help="folder (or s3:// gs:// prefix) for the manifest (it holds no shard data)")
    add_options(p, IndexOptions)
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.index.stage import index

    task = task_options(args)
    task_index, count = task.resolved()
    result = index(args.src, args.out, **as_kwargs(from_args(IndexOptions, args)), task_index=task_index,
                   num_tasks=count, retry_failed=task.retry_failed, max_attempts=task.max_attempts,
                   do_finalize=not task.no_finalize, finalize_only=task.finalize)
    log.info("index: %d shard(s); %s", result.shards,
             result.manifest or "shards indexed; manifest pending other tasks or failed shards")
    return result.report.exit_code

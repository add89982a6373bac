"""``kdpipe ingest SRC --out DIR``: image folder / file list / bundled digits -> WebDataset shards."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli.commands.common import add_task_args, task_options
from pipeline.options import add_options, from_args
from stages.ingest.options import IngestOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("ingest", help="folder / file list / bundled digits -> WebDataset shards + manifest")
    p.add_argument("src", help="folder of class subfolders (labeled), flat folder or file list (unlabeled), "
                               "or 'digits' (bundled)")
    p.add_argument("--out", required=True, type=Path)
    add_options(p, IngestOptions)
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.ingest.stage import ingest

    opts, task = from_args(IngestOptions, args), task_options(args)
    index, count = task.resolved()
    if opts.base is not None:
        return _grow(args, opts, index, count, not task.no_finalize)
    manifests = ingest(args.src, args.out, shard_size=opts.shard_size, shard_bytes=opts.shard_bytes,
                       split=opts.split, seed=opts.seed, task_index=index, num_tasks=count, do_finalize=not task.no_finalize)
    for name, path in manifests.items():
        log.info("%s: %s", name, path if path else "parts committed; manifest pending other tasks")
    return 0


def _grow(args, opts: IngestOptions, index: int, count: int, do_finalize: bool) -> int:
    from pipeline.errors import InputError
    from stages.ingest.base import ingest_grown

    if opts.split:
        raise InputError("--split with --base: a grown dataset is one dataset; split the source separately")
    path = ingest_grown(args.src, args.out, opts.base, shard_size=opts.shard_size, shard_bytes=opts.shard_bytes,
                        task_index=index, num_tasks=count, do_finalize=do_finalize)
    log.info("all: %s", path if path else "parts committed; manifest pending other tasks")
    return 0

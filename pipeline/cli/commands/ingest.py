"""``kdpipe ingest SRC --out DIR``: image folder / file list / bundled digits -> WebDataset shards."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli.commands.common import add_task_args, resolve_task

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("ingest", help="folder / file list / bundled digits -> WebDataset shards + manifest")
    p.add_argument("src", help="folder of class subfolders (labeled), flat folder or file list (unlabeled), "
                               "or 'digits' (bundled)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--shard-bytes", type=int, default=1 << 30, help="bytes per shard, about")
    p.add_argument("--split", default=None, help="e.g. labeled=3/class,test=500,unlabeled=rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, type=Path,
                   help="grow this dataset manifest: its shards (unchanged, same order) then SRC's shards")
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.ingest.stage import ingest

    index, count = resolve_task(args)
    if args.base is not None:
        return _grow(args, index, count)
    manifests = ingest(args.src, args.out, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                       split=args.split, seed=args.seed, task_index=index, num_tasks=count,
                       do_finalize=not args.no_finalize)
    for name, path in manifests.items():
        log.info("%s: %s", name, path if path else "parts committed; manifest pending other tasks")
    return 0


def _grow(args, index: int, count: int) -> int:
    from pipeline.errors import InputError
    from stages.ingest.base import ingest_grown

    if args.split:
        raise InputError("--split with --base: a grown dataset is one dataset; split the source separately")
    path = ingest_grown(args.src, args.out, args.base, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                        task_index=index, num_tasks=count, do_finalize=not args.no_finalize)
    log.info("all: %s", path if path else "parts committed; manifest pending other tasks")
    return 0

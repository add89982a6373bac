"""``kdpipe reshard --selection M --out DIR``: selected samples -> training shards with hard and soft targets."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli.commands.common import add_task_args, resolve_task

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("reshard", help="write the selected samples as training shards (image, cls, soft targets)")
    p.add_argument("--selection", required=True, help="selection manifest")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default=None,
                   help="source dataset manifest (default: the one the selection's logits were made from)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard, about")
    p.add_argument("--shard-bytes", type=int, default=256 << 20, help="bytes per output shard, about")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle within each output shard")
    p.add_argument("--decode-check", action="store_true",
                   help="fully decode every selected image (default: check its signature only)")
    p.add_argument("--max-rows", type=int, default=1_000_000,
                   help="selection rows held in memory at once (memory bound)")
    add_task_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.reshard.stage import reshard

    index, count = resolve_task(args)
    result = reshard(args.selection, args.out, data=args.data, shard_size=args.shard_size,
                     shard_bytes=args.shard_bytes, seed=args.seed, decode_check=args.decode_check,
                     max_rows=args.max_rows, task_index=index, num_tasks=count, retry_failed=args.retry_failed,
                     max_attempts=args.max_attempts, do_finalize=not args.no_finalize,
                     finalize_only=args.finalize)
    log.info("reshard: %s", result.manifest or "parts committed; manifest pending other tasks")
    return result.report.exit_code

"""``kdpipe logits --data M --teacher T --topk K --temperature T --out DIR``: top-K teacher logits in Parquet."""

from __future__ import annotations

import logging

from pipeline.cli.commands.common import add_task_args, out_location, task_options
from pipeline.options import add_options, from_args
from stages.logits.options import LogitsOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("logits", help="a frozen teacher over dataset shards -> top-K logits (Parquet)")
    p.add_argument("--data", required=True, help="dataset manifest")
    p.add_argument("--teacher", required=True, help="teacher card (or a model card) folder or manifest")
    p.add_argument("--topk", type=int, required=True, help="classes stored per image")
    p.add_argument("--temperature", type=float, required=True, help="T of the stored lse = logsumexp(z/T)")
    p.add_argument("--out", required=True, type=out_location, help="folder, or an s3:// or gs:// prefix")
    add_options(p, LogitsOptions)
    add_task_args(p)
    p.set_defaults(func=run)


def _options(args, opts: LogitsOptions) -> dict:
    from stages.views.spec import parse_aug

    aug = None if opts.views == 1 and opts.aug is None else parse_aug(opts.aug, views=opts.views, seed=opts.aug_seed)
    return {"aug": aug, "topk": args.topk, "temperature": args.temperature, "batch_size": opts.batch_size,
            "embeddings": opts.embeddings, "logit_dtype": opts.logit_dtype, "device": opts.device,
            "compile_model": opts.compile, "gpu_decode": opts.gpu_decode, "reuse": opts.reuse}


def run(args) -> int:
    from pipeline.errors import PartFailed
    from stages.logits.stage import compute_logits, finalize_only

    opts, task = from_args(LogitsOptions, args), task_options(args)
    if task.finalize:
        path = finalize_only(args.data, args.teacher, args.out, **_options(args, opts))
        log.info("logits: %s", path or "parts are still missing; see the log")
        return 0 if path else 1
    index, count = task.resolved()
    try:
        path = compute_logits(args.data, args.teacher, args.out, task_index=index, num_tasks=count,
                              loader_batch=opts.loader_batch, num_workers=opts.num_workers, prefetch=opts.prefetch,
                              retry_failed=task.retry_failed, max_attempts=task.max_attempts, threads=opts.threads,
                              finalize=not task.no_finalize, **_options(args, opts))
    except PartFailed as exc:
        log.error("%s", exc)
        return 1
    log.info("logits: %s", path or "this task's parts are committed; the manifest waits for the other tasks")
    return 0

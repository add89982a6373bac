"""``kdpipe logits --data M --teacher T --topk K --temperature T --out DIR``: top-K teacher logits in Parquet."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli.commands.common import add_task_args, resolve_task

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("logits", help="a frozen teacher over dataset shards -> top-K logits (Parquet)")
    p.add_argument("--data", required=True, help="dataset manifest")
    p.add_argument("--teacher", required=True, help="teacher card (or a model card) folder or manifest")
    p.add_argument("--topk", type=int, required=True, help="classes stored per image")
    p.add_argument("--temperature", type=float, required=True, help="T of the stored lse = logsumexp(z/T)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--views", type=int, default=1,
                   help="recorded views per image (view 0 = centre view; V > 1 needs --aug); see docs/views.md")
    p.add_argument("--aug", default=None,
                   help='augmentation of views 1..V-1, e.g. "rrc:0.35-1,flip:0.5,mixup:0.2" (docs/views.md)')
    p.add_argument("--aug-seed", type=int, default=0, help="seed of the recorded views (part of the fingerprint)")
    p.add_argument("--embeddings", action="store_true", help="also store L2-normalised penultimate features")
    p.add_argument("--reuse", default=None,
                   help="old logits of the base of this grown dataset (ingest --base): unchanged shards reuse "
                        "their old parts instead of running the teacher")
    p.add_argument("--logit-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass (fixed; part of the fingerprint: CPU results can depend on it)")
    p.add_argument("--loader-batch", type=int, default=32, help="images per DataLoader record (no effect on output)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decode workers (default: cores/4 on CPU, cores-2 on CUDA; at least 1)")
    p.add_argument("--prefetch", type=int, default=2, help="records prepared ahead per worker")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher (CUDA)")
    p.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the GPU (CUDA)")
    add_task_args(p)
    p.set_defaults(func=run)


def _options(args) -> dict:
    from stages.views.spec import parse_aug

    aug = None if args.views == 1 and args.aug is None else parse_aug(args.aug, views=args.views, seed=args.aug_seed)
    return {"aug": aug, "topk": args.topk, "temperature": args.temperature, "batch_size": args.batch_size,
            "embeddings": args.embeddings, "logit_dtype": args.logit_dtype, "device": args.device,
            "compile_model": args.compile, "gpu_decode": args.gpu_decode, "reuse": args.reuse}


def run(args) -> int:
    from pipeline.errors import PartFailed
    from stages.logits.stage import compute_logits, finalize_only

    if args.finalize:
        path = finalize_only(args.data, args.teacher, args.out, **_options(args))
        log.info("logits: %s", path or "parts are still missing; see the log")
        return 0 if path else 1
    index, count = resolve_task(args)
    try:
        path = compute_logits(args.data, args.teacher, args.out, task_index=index, num_tasks=count,
                              loader_batch=args.loader_batch, num_workers=args.num_workers, prefetch=args.prefetch,
                              retry_failed=args.retry_failed, max_attempts=args.max_attempts,
                              finalize=not args.no_finalize, **_options(args))
    except PartFailed as exc:
        log.error("%s", exc)
        return 1
    log.info("logits: %s", path or "this task's parts are committed; the manifest waits for the other tasks")
    return 0

"""``kdpipe teacher``: train a teacher on a labeled manifest, or ``--import WEIGHTS``; writes a teacher card."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli.commands.train import add_training_args, config_from_args

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("teacher", help="train a teacher (--train M) or import weights (--import W); writes a "
                                       "teacher card")
    p.add_argument("--import", dest="weights", type=Path, default=None, metavar="WEIGHTS",
                   help="existing weights (.safetensors, or a weights-only torch state dict) instead of training")
    p.add_argument("--classes", default=None, help="with --import: a dataset manifest, a names file, a,b,c or N")
    p.add_argument("--sha256", default=None, help="with --import: the weights' pinned sha256, checked before loading")
    add_training_args(p, losses=False, train_required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError
    from stages.teacher.stage import class_names_from, import_teacher
    from stages.train.teacher import train_teacher

    try:
        config = config_from_args(args, loss="hard")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if args.weights is not None:
        if args.train or not args.classes:
            raise InputError("--import WEIGHTS needs --classes (and no --train)")
        path = import_teacher(args.weights, args.out, arch=config.arch, class_names=class_names_from(args.classes),
                              preprocess=config.preprocess, eval_data=args.eval,
                              device="cpu" if args.device == "auto" else args.device, weights_sha256=args.sha256)
    elif args.train:
        path = train_teacher(args.train, args.out, config, eval_data=args.eval, init=args.init, resume=args.resume)
    else:
        raise InputError("kdpipe teacher: give --train M (train a teacher) or --import WEIGHTS --classes C")
    log.info("teacher card: %s", path)
    return 0

"""``kdpipe teacher``: train a teacher on a labeled manifest, ``--import WEIGHTS`` (any source: timm:, hf:,
openclip:, torchvision, smallcnn), or ``--ensemble CARD CARD ...``; writes a teacher card."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli.commands.train import add_training_args, config_from_args
from pipeline.options import add_options, from_args
from stages.teacher.options import ImportOptions

log = logging.getLogger("kdpipe")
_PP_FLAGS = ("size", "crop_fraction", "interpolation", "mean", "std")


def register(sub) -> None:
    p = sub.add_parser("teacher", help="train a teacher (--train M), import weights (--import W), or make an "
                                       "ensemble (--ensemble CARD CARD ...); writes a teacher card")
    p.add_argument("--import", dest="weights", type=Path, default=None, metavar="WEIGHTS",
                   help="existing weights (.safetensors, or a weights-only torch state dict) instead of training")
    p.add_argument("--classes", default=None, help="with --import: a dataset manifest, a names file, a,b,c or N")
    p.add_argument("--sha256", default=None, help="with --import: the weights' pinned sha256, checked before loading")
    add_options(p, ImportOptions, title="import and ensembles")
    add_training_args(p, losses=False, train_required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError
    from stages.teacher.ensemble import write_ensemble
    from stages.train.teacher import train_teacher

    try:
        config = config_from_args(args, loss="hard")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    opts = from_args(ImportOptions, args)
    if opts.ensemble:
        path = write_ensemble(list(opts.ensemble), args.out, opts.combine)
    elif args.weights is not None or (args.arch or "").startswith("hf:"):
        if args.train:
            raise InputError("--import WEIGHTS and --train M exclude each other")
        path = _import(args, config.arch, opts)
    elif args.train:
        path = train_teacher(args.train, args.out, config, eval_data=args.eval, init=args.init, resume=args.resume)
    else:
        raise InputError("kdpipe teacher: give --train M (train a teacher), --import WEIGHTS --classes C, "
                         "--arch hf:FOLDER, or --ensemble CARD CARD ...")
    log.info("teacher card: %s", path)
    return 0


def _import(args: argparse.Namespace, arch: str, opts: ImportOptions) -> Path:
    from pipeline.errors import InputError
    from stages.teacher.stage import class_names_from, import_teacher

    if not args.classes and not arch.startswith("hf:"):
        raise InputError("--import WEIGHTS needs --classes (a dataset manifest, a names file, a,b,c or N)")
    flags = {name: getattr(args, name) for name in _PP_FLAGS} | {"crop_mode": opts.crop_mode}
    return import_teacher(args.weights, args.out, arch=arch,
                          class_names=class_names_from(args.classes) if args.classes else None, flags=flags,
                          eval_data=args.eval, device="cpu" if args.device == "auto" else args.device,
                          weights_sha256=args.sha256, prompts=opts.prompts, class_map=opts.class_map)

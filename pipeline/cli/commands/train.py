"""``kdpipe train --train M --out DIR``: train a student (hard, soft or mix loss), one process or torchrun.

Every training flag comes from ``stages.train.config.TrainConfig`` (defaults and help stated there once);
preprocessing and augmentation flags override the ``--init`` card's preprocessing (else the trainer's default)
and ``AugmentSpec``'s defaults.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.options import add_options, from_args
from stages.train.augment import AugmentSpec
from stages.train.config import DIGITS_PREPROCESS, TrainConfig

log = logging.getLogger("kdpipe")
_LOSS_FIELDS = ("loss", "alpha", "residual")
_PP_FIELDS = ("size", "crop_fraction", "interpolation", "mean", "std")
_AUG = AugmentSpec()


def add_training_args(p: argparse.ArgumentParser, losses: bool = True, train_required: bool = True) -> None:
    """Flags shared by ``train`` and ``teacher``: model, schedule, data, preprocessing, augmentation."""
    p.add_argument("--train", required=train_required, nargs="+", type=Path, metavar="M", help="dataset manifest(s)")
    p.add_argument("--out", required=True, type=Path, help="output folder (card, metrics, checkpoints)")
    p.add_argument("--eval", default=None, type=Path, metavar="M", help="labeled manifest: top-1 per epoch")
    if losses:
        p.add_argument("--teacher-logits", nargs="+", type=Path, default=None, metavar="M",
                       help="logits manifest(s) of the --train dataset(s), joined by key (soft/mix on labeled data)")
    p.add_argument("--init", default=None, type=Path, help="start from a card, a training folder, its "
                                                           "checkpoints folder, or a weights file (fine-tuning)")
    p.add_argument("--resume", action="store_true",
                   help="accepted for older scripts: a rerun always continues from the last checkpoint in --out "
                        "when it was made with the same inputs and parameters (else it is refused, naming them)")
    add_options(p, TrainConfig, skip=() if losses else _LOSS_FIELDS, title="training")
    g = p.add_argument_group(f"preprocessing (default: the --init card's, else {DIGITS_PREPROCESS.size} px, "
                             f"crop {DIGITS_PREPROCESS.crop_fraction}, {DIGITS_PREPROCESS.interpolation})")
    g.add_argument("--size", type=int, default=None, help="input size in pixels")
    g.add_argument("--crop-fraction", type=float, default=None, help="centre view crop fraction")
    g.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest"])
    g.add_argument("--mean", type=float, nargs=3, default=None)
    g.add_argument("--std", type=float, nargs=3, default=None)
    g = p.add_argument_group("augmentation (random resized crop box + flip)")
    g.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help=f"crop area fraction range (default: {_AUG.scale_min} {_AUG.scale_max})")
    g.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help=f"crop aspect ratio range (default: {_AUG.ratio_min:.4g} {_AUG.ratio_max:.4g})")
    g.add_argument("--flip-prob", type=float, default=None,
                   help=f"horizontal flip probability (default: {_AUG.flip_prob})")
    g.add_argument("--no-augment", action="store_true", help="train on the centre view only")


def _augment(args: argparse.Namespace) -> AugmentSpec | None:
    if args.no_augment:
        return None
    scale = args.scale or (_AUG.scale_min, _AUG.scale_max)
    ratio = args.ratio or (_AUG.ratio_min, _AUG.ratio_max)
    flip = _AUG.flip_prob if args.flip_prob is None else args.flip_prob
    return AugmentSpec(scale[0], scale[1], ratio[0], ratio[1], flip)


def config_from_args(args: argparse.Namespace, loss: str | None = None) -> TrainConfig:
    """A ``TrainConfig`` from the flags; arch and preprocessing default to the ``--init`` card's."""
    from stages.imaging import Preprocess
    from stages.train.inputs import card_defaults

    arch, pp = card_defaults(args.init) if args.init else (None, None)
    pp = pp or DIGITS_PREPROCESS
    overrides = {k: tuple(v) if k in ("mean", "std") else v for k in _PP_FIELDS
                 if (v := getattr(args, k)) is not None}
    given = {"preprocess": Preprocess.from_dict({**pp.to_dict(), **overrides}), "augment": _augment(args)}
    if args.arch is None and arch is not None:
        given["arch"] = arch
    if loss is not None:
        given["loss"] = loss
    return from_args(TrainConfig, args, **given)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a student on dataset shards (hard / soft / mix); torchrun for DDP")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.errors import InputError
    from stages.train.loop import train

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    path = train(args.train, args.out, config, init=args.init, teacher_logits=args.teacher_logits,
                 eval_data=args.eval, resume=args.resume)
    log.info("model card: %s", path)
    return 0

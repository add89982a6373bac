"""``kdpipe train --train M --out DIR``: train a student (hard, soft or mix loss), one process or torchrun."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("kdpipe")


def add_training_args(p: argparse.ArgumentParser, losses: bool = True, train_required: bool = True) -> None:
    """Flags shared by ``train`` and ``teacher``: model, schedule, data, preprocessing, augmentation."""
    p.add_argument("--train", required=train_required, nargs="+", type=Path, metavar="M", help="dataset manifest(s)")
    p.add_argument("--out", required=True, type=Path, help="output folder (card, metrics, checkpoints)")
    p.add_argument("--arch", default=None, help="smallcnn or a torchvision model (default: the --init card's, "
                                                "else smallcnn)")
    p.add_argument("--eval", default=None, type=Path, metavar="M", help="labeled manifest: top-1 per epoch")
    if losses:
        p.add_argument("--loss", default="hard", choices=["hard", "soft", "mix"])
        p.add_argument("--alpha", type=float, default=0.5, help="mix: alpha * soft + (1 - alpha) * hard")
        p.add_argument("--residual", default="exact", choices=["exact", "renorm"],
                       help="mass outside the stored top-K: spread evenly (exact) or dropped (renorm)")
        p.add_argument("--teacher-logits", nargs="+", type=Path, default=None, metavar="M",
                       help="logits manifest(s) of the --train dataset(s), joined by key (soft/mix on labeled data)")
    p.add_argument("--init", default=None, type=Path, help="start from a card, a training folder, its "
                                                           "checkpoints folder, or a weights file (fine-tuning)")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=32, help="per rank")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, Nesterov momentum)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine to 0")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank (0: in-process)")
    g.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in the shuffle buffer")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: epoch ends)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--log-every", type=int, default=10, help="steps between logged losses (loss curve)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: torch's default; 1 on a shared, busy CPU)")
    g = p.add_argument_group("preprocessing (default: the --init card's, else suited to the bundled digits)")
    g.add_argument("--size", type=int, default=None, help="input size in pixels (default 28)")
    g.add_argument("--crop-fraction", type=float, default=None, help="centre view crop fraction (default 1.0)")
    g.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest"])
    g.add_argument("--mean", type=float, nargs=3, default=None)
    g.add_argument("--std", type=float, nargs=3, default=None)
    g = p.add_argument_group("augmentation (random resized crop box + flip)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.6, 1.0), metavar=("MIN", "MAX"),
                   help="crop area fraction range")
    g.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"))
    g.add_argument("--flip-prob", type=float, default=0.0, help="horizontal flips (0 for digits)")
    g.add_argument("--no-augment", action="store_true", help="train on the centre view only")


def config_from_args(args: argparse.Namespace, loss: str | None = None):
    """A ``TrainConfig`` from the flags; arch and preprocessing default to the ``--init`` card's."""
    from stages.imaging import Preprocess
    from stages.train.augment import AugmentSpec
    from stages.train.config import DIGITS_PREPROCESS, TrainConfig
    from stages.train.inputs import card_defaults

    arch, pp = card_defaults(args.init) if args.init else (None, None)
    pp = pp or DIGITS_PREPROCESS
    overrides = {k: v for k, v in (("size", args.size), ("crop_fraction", args.crop_fraction),
                                   ("interpolation", args.interpolation),
                                   ("mean", tuple(args.mean) if args.mean else None),
                                   ("std", tuple(args.std) if args.std else None)) if v is not None}
    augment = None if args.no_augment else AugmentSpec(args.scale[0], args.scale[1], args.ratio[0], args.ratio[1],
                                                       args.flip_prob)
    return TrainConfig(
        arch=args.arch or arch or "smallcnn", loss=loss or args.loss, alpha=getattr(args, "alpha", 0.5),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        residual=getattr(args, "residual", "exact"), seed=args.seed, num_workers=args.num_workers,
        shuffle_buffer=args.shuffle_buffer, checkpoint_every=args.checkpoint_every,
        preprocess=Preprocess(**{**pp.to_dict(), **overrides}), augment=augment, device=args.device,
        log_every=args.log_every, threads=args.threads)


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

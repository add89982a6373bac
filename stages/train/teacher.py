"""Teacher training: a classifier trained on labels (hard loss) through the student trainer -> a teacher card."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError
from stages.train.config import TrainConfig
from stages.train.loop import train


def train_teacher(train_data: list[str | Path], out: str | Path, config: TrainConfig, *,
                  eval_data: str | Path | None = None, init: str | Path | None = None,
                  resume: bool = True) -> Path:
    """Supervised training on labeled dataset manifests (hard labels) -> teacher card in ``out``.

    Args:
        train_data: labeled dataset manifests.
        out: the teacher folder (card, weights, metrics.jsonl, loss_curve.png, checkpoints/).
        config: the training configuration; its loss must be ``hard``.
        eval_data: labeled manifest whose top-1 goes into the card's metrics.
        init: starting weights (e.g. a pretrained checkpoint to fine-tune).
        resume: kept for older callers; an interrupted run always continues from its last checkpoint when
            its fingerprint is the same (``stages.train.loop.train``).
    """
    if config.loss != "hard":
        raise InputError(f"a teacher is trained on labels: loss must be 'hard', not {config.loss!r}")
    return train(train_data, out, config, init=init, eval_data=eval_data, resume=resume, kind="teacher",
                 stage="teacher")

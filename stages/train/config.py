"""Training configuration: one frozen dataclass, its fingerprint, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from stages.imaging import Preprocess
from stages.train.augment import AugmentSpec
from stages.train.losses import LOSSES, RESIDUAL_POLICIES

CODE_VERSION = "train-1"
DIGITS_PREPROCESS = Preprocess(size=28, crop_fraction=1.0)


@dataclass(frozen=True)
class TrainConfig:
    """Every parameter that changes what training produces (plus ``device``, ``log_every`` and ``threads``:
    CPU threads per process, 0 = torch's default; on a shared or oversubscribed CPU use 1).

    Defaults suit the bundled digits (8x8 scans rendered at 28 px, ``smallcnn``).
    """

    arch: str = "smallcnn"
    loss: str = "hard"
    alpha: float = 0.5
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    residual: str = "exact"
    seed: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 1000
    checkpoint_every: int = 0
    preprocess: Preprocess = field(default_factory=lambda: DIGITS_PREPROCESS)
    augment: AugmentSpec | None = field(default_factory=AugmentSpec)
    device: str = "auto"
    log_every: int = 10
    threads: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.residual not in RESIDUAL_POLICIES:
            raise ValueError(f"--residual {self.residual!r}: use one of {', '.join(RESIDUAL_POLICIES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_workers < 0 or self.checkpoint_every < 0 or self.threads < 0:
            raise ValueError("--num-workers, --checkpoint-every and --threads must be >= 0")

    def fingerprint_params(self) -> dict:
        """The parameters that change the trained weights (device and logging excluded)."""
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        for name in ("device", "log_every", "threads"):
            data.pop(name)
        return data


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

"""Training configuration: one frozen dataclass, its fingerprint, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from pipeline.options import option
from stages.artifacts.logits_format import RESIDUAL_POLICIES
from stages.imaging import DIGITS, Preprocess
from stages.train.augment import AugmentSpec

CODE_VERSION = "train-1"
LOSSES = ("hard", "soft", "mix")
OPTIMIZERS = ("sgd", "adamw")
DIGITS_PREPROCESS = DIGITS


@dataclass(frozen=True)
class TrainConfig:
    """Every parameter that changes what training produces (plus ``device``, ``log_every`` and ``threads``:
    CPU threads per process, 0 = torch's default; on a shared or oversubscribed CPU use 1).

    Defaults suit the bundled digits (8x8 scans rendered at 28 px, ``smallcnn``).
    """

    arch: str = option("smallcnn", "smallcnn, smallcnn-W (W channels, default 32) or a torchvision model name; "
                                   "with --init CARD and no --arch, the card's")
    loss: str = option("hard", "hard pseudo-labels (cross-entropy), soft teacher targets (KL at T, times T^2), "
                               "or a mix", choices=LOSSES)
    alpha: float = option(0.5, "mix: alpha * soft + (1 - alpha) * hard")
    epochs: int = option(30, "passes over the training shards")
    batch_size: int = option(32, "samples per step, per rank")
    lr: float = option(0.05, "peak learning rate")
    optimizer: str = option("sgd", "sgd (Nesterov momentum, L2 weight decay) or adamw (decoupled weight decay; "
                                   "--momentum is its beta1)", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum (AdamW: beta1)")
    weight_decay: float = option(5e-4, "weight decay (SGD: L2 penalty; AdamW: decoupled, typically 0.01-0.05)")
    warmup_epochs: float = option(1.0, "linear warm-up, then cosine to 0")
    label_smoothing: float = option(0.0, "label smoothing of the hard loss")
    freeze_bn: bool = option(False, "keep BatchNorm running statistics as they are (its layers in eval mode; "
                                    "their scale and shift still train): fine-tuning on a few labeled images")
    residual: str = option("exact", "mass outside the stored top-K: spread evenly (exact) or dropped (renorm)",
                           choices=RESIDUAL_POLICIES)
    seed: int = option(0, "seed of initialisation, shuffling and views")
    num_workers: int = option(0, "DataLoader workers per rank (0: in-process)")
    shuffle_buffer: int = option(1000, "samples in the shuffle buffer")
    checkpoint_every: int = option(0, "steps between checkpoints (0: at epoch ends)")
    preprocess: Preprocess = field(default_factory=lambda: DIGITS_PREPROCESS)
    augment: AugmentSpec | None = field(default_factory=AugmentSpec)
    device: str = option("auto", "where to train", choices=("auto", "cpu", "cuda"))
    log_every: int = option(10, "steps between logged losses (loss curve)")
    threads: int = option(0, "CPU threads per process (0: torch's default; 1 on a shared, busy CPU)")

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
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
        """The parameters that change the trained weights (device and logging excluded; ``optimizer`` and
        ``freeze_bn`` only when not at their defaults, so that configs from before them keep their fingerprints)."""
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        for name in ("device", "log_every", "threads"):
            data.pop(name)
        for name, default in (("optimizer", "sgd"), ("freeze_bn", False)):
            if data[name] == default:
                data.pop(name)
        return data


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

"""The evaluate stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option


@dataclass(frozen=True)
class EvaluateOptions:
    """What a model is compared with, and how its logits are computed."""

    teacher_logits: Path | None = option(None, "teacher logits manifest of the same dataset (agreement, KL)",
                                         type=Path)
    labels: Path | None = option(None, "Parquet of key,label (e.g. _hidden/unlabeled-labels.parquet)", type=Path)
    batch_size: int = option(32, "images per forward pass")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda when available)", type=str)
    num_workers: int | None = option(None, "decode workers of the logits stage", type=int)
    threads: int = option(0, "CPU threads of the forward pass (0: torch's default; 1 on a shared, busy CPU)")

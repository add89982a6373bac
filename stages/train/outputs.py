"""What a training run leaves in its folder besides checkpoints: ``metrics.jsonl`` (one JSON line per
epoch), ``loss_curve.png`` and, last, the card (``weights.safetensors`` + manifest of kind ``model`` or
``teacher``), which marks the run complete. Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_atomic
from stages.artifacts.reports import new_figure, png_bytes

METRICS = "metrics.jsonl"
CURVE = "loss_curve.png"


def write_metrics(out: Path, history: list[dict]) -> Path:
    """Rewrite ``metrics.jsonl`` from the per-epoch records (small: one line per epoch)."""
    body = "".join(json.dumps(record, sort_keys=True) + "\n" for record in history).encode()
    write_atomic(Path(out) / METRICS, body)
    return Path(out) / METRICS


def plot_losses(out: Path, losses: list[list[float]], history: list[dict], title: str) -> Path:
    """``loss_curve.png``: the logged step losses and the per-epoch mean (``artifacts.reports.png_bytes``)."""
    fig = new_figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], lw=0.8, alpha=0.6, label="step loss (rank 0)")
    ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    final = Path(out) / CURVE
    write_atomic(final, png_bytes(fig))
    return final

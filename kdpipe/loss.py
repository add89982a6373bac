"""``kd_loss``: the distillation loss of kdpipe's trainer, for your own loop (imports torch when called).

loss = alpha * T^2 * KL(targets || softmax(student / T)) + (1 - alpha) * CE(student, labels), batch mean:
``stages.train.losses.distillation_loss`` itself (``soft`` at alpha = 1, ``hard`` at alpha = 0, ``mix``
between), so the same batch gives the trainer's value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import InputError


def kd_loss(student_logits: Any, targets: Any, T: Any, alpha: float = 1.0, labels: Any = None, *,
            label_smoothing: float = 0.0) -> Any:
    """The trainer's loss of one batch.

    Args:
        student_logits: (N, C) tensor.
        targets: the teacher's (N, C) probabilities at T (tensor or array; ``soft_targets``/``wds_targets``
            dense), or ``Sparse(indices, probs, residual)`` batched (the residual is spread evenly over the
            other classes, as the trainer does). Unused when ``alpha`` is 0.
        T: the temperature of ``targets`` (a float or an (N,) tensor); the student is softened by it too.
        alpha: weight of the soft term; 1 - alpha weighs cross-entropy on ``labels``.
        labels: (N,) int64 hard labels; needed when ``alpha`` < 1.
        label_smoothing: of the hard term (the trainer's ``--label-smoothing``).
    """
    import torch

    from stages.train.losses import distillation_loss

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"kd_loss: alpha must be in [0, 1], got {alpha}")
    kind = "soft" if alpha == 1.0 else "hard" if alpha == 0.0 else "mix"
    if kind != "soft" and labels is None:
        raise InputError(f"kd_loss: alpha={alpha} < 1 weighs cross-entropy on hard labels: pass labels=")
    if kind != "hard" and targets is None:
        raise InputError("kd_loss: alpha > 0 needs the teacher's targets")
    probs = None if kind == "hard" else _dense(targets, student_logits.shape[1], student_logits.device, torch)
    labels = None if labels is None else torch.as_tensor(labels, device=student_logits.device).long()
    return distillation_loss(kind, student_logits, labels, probs, T if kind != "hard" else None, alpha,
                             label_smoothing)


def _dense(targets: Any, num_classes: int, device: Any, torch: Any) -> Any:
    """(N, C) float32 tensor of dense or ``Sparse`` targets (residual spread over the unstored classes)."""
    if isinstance(targets, tuple) and len(targets) == 3:
        index, probs, residual = (torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t, device=device)
                                  for t in targets)
        out = torch.zeros(len(probs), num_classes, dtype=torch.float64, device=device)
        others = num_classes - probs.shape[1]
        if others > 0:
            out += (residual.double() / others).reshape(-1, 1)
        return out.scatter_(1, index.long(), probs.double()).float()
    dense = targets if torch.is_tensor(targets) else torch.as_tensor(np.asarray(targets))
    if dense.ndim != 2 or dense.shape[1] != num_classes:
        raise InputError(f"kd_loss: targets of shape {tuple(dense.shape)}, the student gives {num_classes} classes")
    return dense.to(device).float()

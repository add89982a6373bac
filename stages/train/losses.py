"""Training losses: hard pseudo-label cross-entropy, Hinton's soft KD from stored top-K, and their mix.

The teacher's softened distribution at temperature T is rebuilt from top-K storage exactly like
``stages.artifacts.logits_format.dense_targets`` (the numpy reference), here in torch so it runs on the device:
p_k = exp(z_k / T - lse) for the stored classes; the residual mass 1 - sum p_k is spread evenly over the
C - K other classes (``exact``) or dropped and the top-K renormalised (``renorm``).

soft = T^2 * KL(p_teacher || softmax(z_student / T)), averaged over the batch (Hinton et al. 2015).
mix = alpha * soft + (1 - alpha) * hard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.artifacts.logits_format import RESIDUAL_POLICIES
from stages.train.config import LOSSES


def teacher_distribution(topk_index: torch.Tensor, topk_logit: torch.Tensor, lse: torch.Tensor,
                         temperature: torch.Tensor | float, num_classes: int,
                         policy: str = "exact") -> torch.Tensor:
    """Dense (N, C) teacher probabilities at T rebuilt from stored top-K logits and lse.

    Args:
        topk_index: (N, K) class ids.
        topk_logit: (N, K) raw teacher logits of those classes.
        lse: (N,) logsumexp(z / T) over all classes.
        temperature: T, a float or an (N,) tensor.
        num_classes: C.
        policy: ``exact`` or ``renorm`` (see the module docstring).
    """
    if policy not in RESIDUAL_POLICIES:
        raise ValueError(f"residual policy {policy!r} is not one of {RESIDUAL_POLICIES}")
    temp = torch.as_tensor(temperature, dtype=torch.float64, device=topk_logit.device).reshape(-1, 1)
    probs = torch.exp(topk_logit.double() / temp - lse.double().reshape(-1, 1))
    n, k = probs.shape
    out = torch.zeros(n, num_classes, dtype=torch.float64, device=probs.device)
    if policy == "exact" and num_classes > k:
        residual = (1.0 - probs.sum(dim=1)).clamp(0.0, 1.0)
        out += (residual / (num_classes - k)).unsqueeze(1)
    else:
        probs = probs / probs.sum(dim=1, keepdim=True)
    out.scatter_(1, topk_index.long(), probs)
    return out.float()


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the (pseudo-)label, batch mean."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def soft_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """T^2 * KL(teacher || softmax(logits / T)), batch mean; a per-sample T is allowed."""
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).reshape(-1, 1)
    log_student = F.log_softmax(logits.float() / temp, dim=1)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(dim=1)
    return (kl * temp.reshape(-1) ** 2).mean()


def distillation_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor | None,
                      teacher_probs: torch.Tensor | None, temperature: torch.Tensor | float | None,
                      alpha: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss ``kind`` (hard | soft | mix): mix = alpha * soft + (1 - alpha) * hard."""
    if kind not in LOSSES:
        raise ValueError(f"loss {kind!r} is not one of {LOSSES}")
    if kind == "hard":
        return hard_loss(logits, labels, label_smoothing)
    soft = soft_loss(logits, teacher_probs, temperature)
    if kind == "soft":
        return soft
    return alpha * soft + (1.0 - alpha) * hard_loss(logits, labels, label_smoothing)

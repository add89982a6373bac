"""Teachers made of teachers: a class-space map around one model, and an ensemble of members.

- ``ClassMap``: target class j gets ``logsumexp`` of the source logits of its group (a group of one: that logit,
  exactly), so a many-to-one map sums the source classes' probabilities (softmax over the target classes =
  the summed source probabilities, renormalised over the mapped source classes).
- ``Ensemble``: members see their own input (an ensemble's distinct preprocessings, by index) and are combined by
  ``mean-logits`` (the mean of the members' logits) or ``mean-probs`` (log of the mean of their softmax
  probabilities, used as logits: softmax of it at T = 1 is the mean probability).
"""

from __future__ import annotations

import math

import torch
from torch import nn

COMBINES = ("mean-logits", "mean-probs")


class ClassMap(nn.Module):
    """Logits over target classes from a model's logits over source classes (groups of source ids)."""

    def __init__(self, model: nn.Module, groups: list[list[int]], source_classes: int):
        super().__init__()
        self.model = model
        width = max(len(g) for g in groups)
        index = torch.full((len(groups), width), source_classes, dtype=torch.long)  # pad -> the -inf column
        for j, group in enumerate(groups):
            index[j, : len(group)] = torch.tensor(group, dtype=torch.long)
        self.register_buffer("index", index, persistent=False)
        self.single = width == 1

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        z = self.model(*x)
        if self.single:
            return z[:, self.index[:, 0]]
        pad = z.new_full((z.shape[0], 1), float("-inf"))
        return torch.logsumexp(torch.cat([z, pad], dim=1)[:, self.index], dim=2)


class Ensemble(nn.Module):
    """Members on their own inputs, combined into one logits tensor."""

    def __init__(self, members: list[nn.Module], inputs: list[int], combine: str):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine {combine!r}: one of {', '.join(COMBINES)}")
        self.members, self.inputs, self.combine = nn.ModuleList(members), list(inputs), combine

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        outs = [member(xs[i]).float() for member, i in zip(self.members, self.inputs)]
        return combine(outs, self.combine)


def combine(logits: list[torch.Tensor], how: str) -> torch.Tensor:
    """``mean-logits`` or ``mean-probs`` (log of the mean softmax) of the members' logits."""
    if how == "mean-logits":
        return torch.stack(logits).mean(0)
    logp = torch.stack([torch.log_softmax(z, dim=1) for z in logits])
    return torch.logsumexp(logp, dim=0) - math.log(len(logits))

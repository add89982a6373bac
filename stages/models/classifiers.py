"""Model construction by architecture name: any torchvision classification model, plus ``smallcnn``.

``smallcnn`` suits tiny images (the bundled 8x8 digits rendered at 28 px); ``smallcnn-W`` is the same network
with W channels in its first block (default 32; the name, recorded in the card as ``arch``, rebuilds it). Every
model exposes its penultimate features through ``features_and_logits`` (used for dedup embeddings).
"""

from __future__ import annotations

import re

import torch
from torch import nn

SMALL_ARCHS = ("smallcnn",)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; about 100k parameters; for 28-32 px inputs."""

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.body(x)))


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised classifier named ``arch`` with ``num_classes`` outputs (no downloads)."""
    small = re.fullmatch(r"smallcnn(?:-(\d+))?", arch)
    if small:
        width = int(small.group(1) or 32)
        if not 1 <= width <= 1024:
            raise ValueError(f"architecture {arch!r}: smallcnn-W takes a width W in 1..1024")
        return SmallCNN(num_classes, width=width)
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise ValueError(f"unknown architecture {arch!r}: use 'smallcnn' or a torchvision classification "
                         f"model name ({exc})") from None


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer of a classifier (``fc``, ``head``, ``heads.head`` or last of ``classifier``)."""
    for name in ("fc", "head", "heads", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return module
        if isinstance(module, nn.Sequential):
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier head")
    return linears[-1]


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` once and return (penultimate features, logits), via a hook on the head's input."""
    captured = {}

    def hook(module, inputs, output) -> None:  # must return None: a value would replace the output
        captured["f"] = inputs[0]

    handle = classifier_head(model).register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured["f"].flatten(1), logits

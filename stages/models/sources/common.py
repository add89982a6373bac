"""What every teacher source shares: the named error for a missing extra, weights that must fit the architecture,
and preprocessing values that carry where they came from.

A source's library is an optional extra; ``require`` is where a missing one becomes an ``InputError`` saying which
extra to install (the import itself stays deferred in the source's loader; see ``stages.models.sources``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from pipeline.errors import InputError

EXTRAS = {"timm": "timm", "transformers": "hf", "open_clip": "openclip"}


def require(module: str, arch: str) -> ModuleType:
    """Import an optional library (``timm``, ``transformers``, ``open_clip``) or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module, module)
        raise InputError(f"--arch {arch}: needs the {module!r} package, which is not installed ({exc}); install the "
                         f"extra: pip install 'kdpipe[{extra}]'") from None


@dataclass
class Resolved:
    """Preprocessing values a source resolved from the model's own config, each with its origin."""

    values: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)

    def set(self, name: str, value, origin: str) -> None:
        if value is not None:
            self.values[name], self.origin[name] = value, origin


def fit(model: nn.Module, state: dict[str, torch.Tensor], weights: str | Path, arch: str, classes: int) -> None:
    """Load ``state`` into ``model`` strictly, or raise ``InputError`` naming the file and the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise InputError(f"{weights}: does not fit {arch} with {classes} classes: "
                         f"{_mismatch(own, state, missing, unexpected, shapes, classes)}")
    model.load_state_dict(state, strict=True)


def _mismatch(own: dict, state: dict, missing: list, unexpected: list, shapes: list, classes: int) -> str:
    parts = []
    if shapes:
        key = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es), first {key}: the file has {list(state[key].shape)}, the "
                     f"model {list(own[key].shape)}")
    head = shapes and all(own[k].shape[0] == classes != state[k].shape[0] for k in shapes)
    if head and not missing and not unexpected:
        return parts[0] + (f" (the file's head has {state[shapes[0]].shape[0]} classes, --classes gave {classes}: "
                           "give its class names, and --class-map to map them onto yours)")
    if missing:
        parts.append(f"{len(missing)} missing key(s), first {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first {', '.join(unexpected[:3])}")
    return "; ".join(parts) + " (is --arch the architecture these weights were trained as?)"

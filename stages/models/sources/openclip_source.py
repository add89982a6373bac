"""``openclip:NAME``: a CLIP zero-shot teacher from a local open_clip checkpoint (``NAME`` a model config of
open_clip, or a path to a model config JSON).

At import the text tower encodes each class name through every prompt template (``--prompts FILE``, one template a
line with ``{}`` for the name), the normalised embeddings are averaged and normalised again: a fixed head (C x D)
stored with the image tower in the card's ``weights.safetensors`` (key ``head.weight``; ``logit_scale`` is the
checkpoint's exp(logit_scale)). The logits are ``logit_scale * cos(image features, head)``; the text tower is not
kept. The image tower is rebuilt from the stored config (``openclip_config``).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError
from stages.models.sources.common import Resolved, require


class ZeroShot(nn.Module):
    """Image tower + fixed text head: ``logit_scale * normalize(visual(x)) @ head.T``."""

    def __init__(self, visual: nn.Module, head: torch.Tensor, logit_scale: float):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        self.head.weight.data.copy_(head)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(nn.functional.normalize(self.visual(x), dim=-1))


def read_prompts(path: str | Path | None, arch: str) -> list[str]:
    """Prompt templates, one a line, each with ``{}`` where the class name goes."""
    if path is None:
        raise InputError(f"--arch {arch}: a zero-shot head needs --prompts FILE (one template a line, e.g. "
                         "'a photo of a {}.')")
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise InputError(f"{path}: every prompt template needs '{{}}' for the class name ({bad[:1] or 'empty file'})")
    return lines


def model_config(name: str, arch: str) -> tuple[str, dict]:
    """(registered model name, its config); a ``.json`` path is registered with open_clip first."""
    open_clip = require("open_clip", arch)
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise InputError(f"--arch {arch}: no such model config file {name}")
        open_clip.add_model_config(name)
        return Path(name).stem, json.loads(Path(name).read_text())
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        raise InputError(f"--arch {arch}: open_clip has no model config {name!r}"
                         + (f"; did you mean {' or '.join('openclip:' + c for c in close)}?" if close else ""))
    return name, config


def create(name: str, arch: str) -> nn.Module:
    """The full CLIP model, randomly initialised (weights come from the checkpoint)."""
    return require("open_clip", arch).create_model(name, pretrained=None)


@torch.no_grad()
def zero_shot(model: nn.Module, name: str, class_names: list[str], prompts: list[str], arch: str) -> ZeroShot:
    """Encode the class names through the templates into the fixed head."""
    tokenizer = require("open_clip", arch).get_tokenizer(name)
    model.eval()
    rows = []
    for cls in class_names:
        emb = model.encode_text(tokenizer([t.format(cls) for t in prompts]))
        rows.append(nn.functional.normalize(nn.functional.normalize(emb, dim=-1).mean(0), dim=-1))
    return ZeroShot(model.visual, torch.stack(rows), float(model.logit_scale.exp()))


def build(config: dict, num_classes: int, arch: str) -> ZeroShot:
    """The image tower and an empty head from a stored config (weights loaded by the caller)."""
    require("open_clip", arch)
    from open_clip.model import _build_vision_tower  # the optional extra's own builder (deferred like its import)

    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    return ZeroShot(visual, torch.zeros(num_classes, config["embed_dim"]), 1.0)


def resolve(model: nn.Module, arch: str) -> Resolved:
    """The image tower's eval preprocessing (``visual.preprocess_cfg``), the way ``open_clip`` preprocess renders."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    where = "open_clip preprocess_cfg"
    out = Resolved()
    size = cfg.get("size")
    side = size if isinstance(size, int) else (size[0] if size and size[0] == size[1] else None)
    mode = {"shortest": "center", "squash": "squash"}.get(cfg.get("resize_mode", "shortest"))
    if side and mode:
        out.set("size", int(side), where)
        out.set("resize", int(side), where)
        out.set("crop_fraction", 1.0, where)
        out.set("crop_mode", mode, where)
    out.set("interpolation", cfg.get("interpolation", "bicubic"), where)
    if cfg.get("mean") is not None:
        out.set("mean", tuple(float(v) for v in cfg["mean"]), where)
        out.set("std", tuple(float(v) for v in cfg["std"]), where)
    return out

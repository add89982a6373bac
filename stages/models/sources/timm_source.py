"""``timm:NAME``: any timm model, built with ``pretrained=False`` (no hub download), weights from a local file.

Preprocessing comes from timm's own data config of the model's pretrained config (``resolve_data_config``): input
size, ``crop_pct``, ``crop_mode``, interpolation, mean, std; kdpipe then renders exactly what
``timm.data.create_transform(**cfg)`` gives (``stages.imaging``, crop mode ``center`` / ``squash``).
"""

from __future__ import annotations

import difflib

from torch import nn

from pipeline.errors import InputError
from stages.models.sources.common import Resolved, require

CROP_MODES = {"center": "center", "squash": "squash"}


def build(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised timm model (``pretrained=False``) with ``num_classes`` outputs."""
    timm = require("timm", f"timm:{name}")
    if not timm.is_model(name):
        raise InputError(f"--arch timm:{name}: timm {timm.__version__} has no model {name!r}{suggest(name)}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def suggest(name: str) -> str:
    """``; did you mean timm:X?`` for the closest timm model names, or ''."""
    timm = require("timm", f"timm:{name}")
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join('timm:' + c for c in close)}?" if close else ""


def has(name: str) -> bool:
    """Whether timm (when installed) knows ``name``."""
    try:
        timm = require("timm", f"timm:{name}")
    except InputError:
        return False
    return bool(timm.is_model(name))


def resolve(model: nn.Module, name: str) -> Resolved:
    """The model's eval preprocessing from timm's data config, each value with its origin."""
    timm_data = require("timm.data", f"timm:{name}")
    cfg = timm_data.resolve_data_config({}, model=model)
    pretrained = getattr(model, "pretrained_cfg", {}) or {}
    where = f"timm pretrained_cfg {pretrained.get('architecture', name)}.{pretrained.get('tag') or 'default'}"
    out = Resolved()
    _, height, width = cfg["input_size"]
    if height == width:
        out.set("size", int(height), where)
    out.set("crop_fraction", float(cfg.get("crop_pct") or 0.875), where)
    out.set("interpolation", cfg.get("interpolation"), where)
    out.set("mean", tuple(float(v) for v in cfg["mean"]), where)
    out.set("std", tuple(float(v) for v in cfg["std"]), where)
    mode = cfg.get("crop_mode") or "center"
    if mode not in CROP_MODES:
        raise InputError(f"--arch timm:{name}: timm's crop_mode {mode!r} is not rendered by kdpipe; give "
                         "--crop-mode center|squash (and --size/--crop-fraction) to choose one")
    out.set("crop_mode", CROP_MODES[mode], where)
    return out

"""``hf:FOLDER``: a Hugging Face image classifier saved with ``save_pretrained`` (config.json, model.safetensors or
pytorch_model.bin, preprocessor_config.json), read from the folder only (``local_files_only``).

The card keeps the model's config (``hf_config``, rebuilt with ``AutoConfig.for_model``) and the weights;
class names come from ``id2label``. Preprocessing comes from the folder's image processor as
``AutoImageProcessor`` loads it (its backend included: Pillow or torchvision tensors): ``size`` height/width is a
squash resize, ``shortest_edge`` + ``crop_size`` a resize of the shorter side and a centre crop (offsets floored,
as HF crops), ConvNeXt's ``crop_pct`` its own rule.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.errors import InputError
from stages.models.sources.common import Resolved, require

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class Logits(nn.Module):
    """An HF image classifier as a plain ``x -> logits`` module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def open_folder(folder: str | Path, arch: str):
    """(config, image processor) of a saved folder, read locally only."""
    transformers = require("transformers", arch)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"--arch {arch}: {folder} holds no config.json (save the model with save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--arch {arch}: cannot read the config or preprocessor_config.json in {folder}: "
                         f"{exc}") from None
    return config, processor


def weights_in(folder: str | Path, arch: str) -> Path:
    """The folder's weights file (model.safetensors, else pytorch_model.bin)."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise InputError(f"--arch {arch}: {folder} holds none of {', '.join(WEIGHT_FILES)}; give --import WEIGHTS")


def class_names(config) -> list[str]:
    """Class names in head order, from ``id2label``."""
    return [str(config.id2label[i]) for i in range(int(config.num_labels))]


def config_dict(config) -> dict:
    """The config as plain JSON (stored in the card)."""
    return json.loads(config.to_json_string(use_diff=False))


def load(folder: str | Path, arch: str) -> nn.Module:
    """The folder's classifier with its own weights (``from_pretrained``, local files only: it converts keys of
    older checkpoints); any missing, unexpected or mismatched key is refused naming the file."""
    transformers = require("transformers", arch)
    try:
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{weights_in(folder, arch)}: does not load as {arch}: {exc}") from None
    bad = [f"{len(v)} {k.replace('_', ' ')}, first {', '.join(map(str, list(v)[:3]))}"
           for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if bad:
        raise InputError(f"{weights_in(folder, arch)}: does not fit {arch}: {'; '.join(bad)}")
    return model.eval()


def build(hf_config: dict, arch: str) -> nn.Module:
    """A freshly initialised classifier from a stored config."""
    transformers = require("transformers", arch)
    data = dict(hf_config)
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    return transformers.AutoModelForImageClassification.from_config(config)


def resolve(processor, arch: str) -> Resolved:
    """The processor's eval preprocessing; anything kdpipe cannot render the same way is left unresolved."""
    where = f"HF {type(processor).__name__} (preprocessor_config.json)"
    out = Resolved()
    factor = float(getattr(processor, "rescale_factor", 1 / 255))
    if getattr(processor, "do_rescale", True) and abs(factor * 255 - 1) > 1e-6:
        raise InputError(f"--arch {arch}: rescale_factor {processor.rescale_factor} is not 1/255; kdpipe feeds "
                         "pixels / 255")
    _geometry(processor, out, where)
    out.set("interpolation", RESAMPLE.get(int(getattr(processor, "resample", 2) or 0)), where)
    if getattr(processor, "do_normalize", True):
        out.set("mean", tuple(float(v) for v in processor.image_mean), where)
        out.set("std", tuple(float(v) for v in processor.image_std), where)
    else:
        out.set("mean", (0.0, 0.0, 0.0), where + ", do_normalize false")
        out.set("std", (1.0, 1.0, 1.0), where + ", do_normalize false")
    out.set("crop_offset", "floor", where)
    out.set("backend", "torchvision" if getattr(processor, "backend", "pil") == "torchvision" else "pil", where)
    return out


def _size(value, key: str):
    if value is None:
        return None
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def _geometry(processor, out: Resolved, where: str) -> None:
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    center = bool(getattr(processor, "do_center_crop", False)) and _size(crop, "height")
    height, width, short = _size(size, "height"), _size(size, "width"), _size(size, "shortest_edge")
    crop_pct = getattr(processor, "crop_pct", None)
    if height and width and height == width:
        side = int(_size(crop, "height")) if center else int(height)
        out.set("crop_mode", "squash", where)
        out.set("resize", int(height), where)
        out.set("size", side, where)
        out.set("crop_fraction", side / int(height), where)
    elif short and crop_pct is not None:  # ConvNeXt: shorter side to S / crop_pct, centre crop S (S < 384)
        resize = int(short / crop_pct) if short < 384 else int(short)
        out.set("crop_mode", "center" if short < 384 else "squash", where)
        out.set("resize", resize, where)
        out.set("size", int(short), where)
        out.set("crop_fraction", int(short) / resize, where)
    elif short and center and _size(crop, "height") == _size(crop, "width"):
        out.set("crop_mode", "center", where)
        out.set("resize", int(short), where)
        out.set("size", int(_size(crop, "height")), where)
        out.set("crop_fraction", int(_size(crop, "height")) / int(short), where)

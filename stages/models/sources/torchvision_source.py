"""Torchvision classification names and ``smallcnn`` (``stages.models.classifiers.build_model``) as imports.

Their preprocessing: ``smallcnn`` takes kdpipe's own small-image default (the trainer's); a torchvision name takes
the crop, resize, interpolation, mean and std of its default weights' transforms (``ImageClassification``),
rendered with kdpipe's centre box (``crop_mode`` box, the policy these cards always had). An unknown name gets a
close torchvision or timm name suggested.
"""

from __future__ import annotations

import difflib
import re

import torchvision

from pipeline.errors import InputError
from stages.imaging import DIGITS
from stages.models.sources import timm_source
from stages.models.sources.common import Resolved

SMALL_PREPROCESS = DIGITS  # smallcnn's own default (the bundled digits at 28 px)


def check(arch: str) -> None:
    """Refuse an architecture that is neither ``smallcnn[-W]`` nor a torchvision classifier, with a suggestion."""
    if re.fullmatch(r"smallcnn(?:-\d+)?", arch) or arch in classifiers():
        return
    hint = ""
    name = re.sub(r"^(timm)[/_-]", "", arch)
    if timm_source.has(name):
        hint = f"; timm has it: use --arch timm:{name}"
    else:
        close = difflib.get_close_matches(arch, ["smallcnn", *classifiers()], n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise InputError(f"--arch {arch}: unknown architecture (not smallcnn nor a torchvision classification model; "
                     f"prefixes: timm:NAME, hf:FOLDER, openclip:NAME){hint}")


def classifiers() -> list[str]:
    """Torchvision's classification model names."""
    return torchvision.models.list_models(module=torchvision.models)


def resolve(arch: str) -> Resolved:
    """smallcnn's default, or the default weights' transforms of a torchvision model."""
    out = Resolved()
    if arch.startswith("smallcnn"):
        where = "kdpipe smallcnn default"
        for name in ("size", "crop_fraction", "interpolation", "mean", "std"):
            out.set(name, getattr(SMALL_PREPROCESS, name), where)
        return out
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    tf = weights.transforms()
    where = f"torchvision {type(weights).__name__}.{weights.name} transforms"
    crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
    out.set("size", crop, where)
    out.set("crop_fraction", crop / resize, where)
    out.set("interpolation", tf.interpolation.value, where)
    out.set("mean", tuple(float(v) for v in tf.mean), where)
    out.set("std", tuple(float(v) for v in tf.std), where)
    return out

"""Teacher sources, chosen by the prefix of ``--arch``; weights always from a local path, never a hub download.

- ``timm:NAME`` (``timm_source``): ``timm.create_model(NAME, pretrained=False, num_classes=C)``; preprocessing
  from timm's data config of the model's pretrained config.
- ``hf:FOLDER`` (``hf_source``): a ``save_pretrained`` image classifier; class names from ``id2label``;
  preprocessing from its image processor. The card records ``hf:<model_type>`` and the config.
- ``openclip:NAME`` (``openclip_source``): a CLIP zero-shot head from class names through prompt templates.
- anything else (``torchvision_source``): a torchvision classification name or ``smallcnn[-W]``, as before.
- ``compose``: class-space maps and ensembles around these.

Deferred imports: timm, transformers and open_clip are optional install extras (``kdpipe[timm]``, ``kdpipe[hf]``,
``kdpipe[openclip]``). Each source imports its library inside its loader (``common.require``): the one deferred
import kdpipe allows, so that kdpipe runs without them, and a missing one is an ``InputError`` (rc 2) naming the
extra to install.

``import_model`` builds and loads a model for ``kdpipe teacher --import``; ``build``/``runnable`` rebuild a card's
model from its params; ``preprocess_for`` merges the resolved preprocessing with the flags (no silent default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from stages.imaging import Preprocess
from stages.models.classifiers import build_model
from stages.models.sources import hf_source, openclip_source, timm_source, torchvision_source
from stages.models.sources.common import Resolved, fit
from stages.models.sources.compose import ClassMap
from stages.models.sources.weights import load_state_dict

PREFIXES = ("timm", "hf", "openclip")
FLAGS = {"size": "--size", "crop_fraction": "--crop-fraction", "interpolation": "--interpolation",
         "mean": "--mean", "std": "--std", "crop_mode": "--crop-mode"}
_NEEDED = ("size", "crop_fraction", "interpolation", "mean", "std")


@dataclass
class Imported:
    """A loaded model for a new card: the module whose weights the card keeps, its classes, its preprocessing."""

    arch: str
    model: nn.Module
    class_names: list[str]
    resolved: Resolved
    params: dict


def split(arch: str) -> tuple[str | None, str]:
    """(prefix, name) of ``timm:NAME`` / ``hf:FOLDER`` / ``openclip:NAME``; (None, arch) otherwise."""
    prefix, sep, name = arch.partition(":")
    return (prefix, name) if sep and prefix in PREFIXES else (None, arch)


def import_model(arch: str, weights: str | Path | None, class_names: list[str] | None, *,
                 prompts: str | Path | None = None, weights_sha256: str | None = None) -> Imported:
    """Build ``arch`` and load ``weights`` into it (checked to fit); refuse with a named error otherwise."""
    prefix, name = split(arch)
    if prefix == "hf":
        return _import_hf(arch, name, weights, class_names, weights_sha256)
    if weights is None or not class_names:
        raise InputError(f"--arch {arch}: give --import WEIGHTS and --classes C")
    if prefix == "openclip":
        return _import_openclip(arch, name, weights, class_names, prompts, weights_sha256)
    state = load_state_dict(weights, weights_sha256)
    if prefix == "timm":
        model = timm_source.build(name, len(class_names))
        fit(model, state, weights, arch, len(class_names))
        return Imported(arch, model, list(class_names), timm_source.resolve(model, name), {})
    torchvision_source.check(arch)
    model = build_model(arch, len(class_names))
    fit(model, state, weights, arch, len(class_names))
    return Imported(arch, model, list(class_names), torchvision_source.resolve(arch), {})


def _import_hf(arch: str, folder: str, weights, class_names, weights_sha256) -> Imported:
    config, processor = hf_source.open_folder(folder, arch)
    own = hf_source.class_names(config)
    if class_names and len(class_names) != len(own):
        raise InputError(f"--classes: {len(class_names)} names, but {folder}/config.json has {len(own)} labels "
                         "(id2label); leave --classes out to use them, or map classes with --class-map")
    if weights is not None:
        raise InputError(f"--arch {arch}: loads the folder's own weights; leave --import out")
    if weights_sha256 is not None:
        load_state_dict(hf_source.weights_in(folder, arch), weights_sha256)  # the pin, checked before loading
    model = hf_source.load(folder, arch)
    source = hf_source.weights_in(folder, arch)
    params = {"hf_config": hf_source.config_dict(config),
              "imported_from": {"file": str(Path(folder) / source.name), "sha256": sha256_file(source)}}
    return Imported(f"hf:{config.model_type}", model, list(class_names or own), hf_source.resolve(processor, arch),
                    params)


def _import_openclip(arch: str, name: str, weights, class_names, prompts, weights_sha256) -> Imported:
    templates = openclip_source.read_prompts(prompts, arch)
    registered, config = openclip_source.model_config(name, arch)
    clip = openclip_source.create(registered, arch)
    fit(clip, load_state_dict(weights, weights_sha256), weights, arch, len(class_names))
    model = openclip_source.zero_shot(clip, registered, list(class_names), templates, arch)
    params = {"openclip_config": config, "prompts": templates}
    return Imported(f"openclip:{registered}", model, list(class_names), openclip_source.resolve(clip, arch), params)


def build(params: dict) -> nn.Module:
    """The bare model of a card (the module its ``weights.safetensors`` belongs to), freshly initialised."""
    arch = params["arch"]
    prefix, name = split(arch)
    classes = len(params["class_map"]["source_classes"]) if params.get("class_map") else int(params["num_classes"])
    if prefix == "timm":
        return timm_source.build(name, classes)
    if prefix == "hf":
        return hf_source.build(params["hf_config"], arch)
    if prefix == "openclip":
        return openclip_source.build(params["openclip_config"], classes, arch)
    return build_model(arch, classes)


def runnable(model: nn.Module, params: dict) -> nn.Module:
    """The ``x -> logits over the card's classes`` module around a card's bare model."""
    if split(params["arch"])[0] == "hf":
        model = hf_source.Logits(model)
    cmap = params.get("class_map")
    if cmap:
        model = ClassMap(model, cmap["groups"], len(cmap["source_classes"]))
    return model


def preprocess_for(resolved: Resolved, flags: dict, arch: str) -> tuple[Preprocess, dict]:
    """The preprocessing of a new card (the resolved values, overridden by the flags given) and each value's origin.

    Raises ``InputError`` naming the flags when a value is neither resolved nor given.
    """
    values, origin = dict(resolved.values), dict(resolved.origin)
    for name, value in flags.items():
        if value is not None:
            values[name], origin[name] = (tuple(value) if name in ("mean", "std") else value), f"flag {FLAGS[name]}"
    missing = [FLAGS[n] for n in _NEEDED if n not in values]
    if missing:
        raise InputError(f"--arch {arch}: its preprocessing is not in the model's own config; give "
                         f"{' '.join(missing)} (the values the model was trained with)")
    mode = values.setdefault("crop_mode", "box")
    origin.setdefault("crop_mode", "kdpipe centre box (no library transform)")
    if mode == "box":
        for name in ("resize", "crop_offset", "backend"):
            values.pop(name, None), origin.pop(name, None)
    elif "resize" not in values or any(flags.get(n) is not None for n in ("size", "crop_fraction")):
        values["resize"] = math.floor(values["size"] / values["crop_fraction"])
        origin["resize"] = "floor(size / crop_fraction), timm's rule"
    try:
        return Preprocess(**values), {k: origin[k] for k in sorted(values) if k in origin}
    except ValueError as exc:
        raise InputError(f"--arch {arch}: preprocessing {values}: {exc}") from None

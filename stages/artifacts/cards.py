"""Classifier cards: a folder with ``weights.safetensors`` and a ``teacher`` (or ``model``) manifest.

The card says everything a user of the logits needs to know about how the teacher saw the images:
architecture, class-index map, preprocessing, weights sha256, accuracy. Weights load only from
safetensors, or from a state dict through ``torch.load(weights_only=True)``; never plain pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import manifest as mf
from pipeline.atomic import publish, staged
from pipeline.errors import InputError, ManifestError
from pipeline.hashing import sha256_file
from stages.imaging import Preprocess
from stages.models import sources
from stages.models.sources.compose import Ensemble
from stages.models.sources.weights import load_safetensors, load_state_dict  # noqa: F401  (load_state_dict re-exported)

WEIGHTS = "weights.safetensors"

ENSEMBLE = "ensemble"  # the arch of an ensemble card (members in params, no weights of its own)


def write_card(out: Path, model: torch.nn.Module, *, arch: str, class_names: list[str], preprocess: Preprocess,
               stage: str, inputs: list[dict] | None = None, metrics: dict | None = None,
               extra: dict | None = None, kind: str = "teacher") -> Path:
    """Save ``model``'s weights (safetensors) and its card in ``out``; return the manifest path.

    Args:
        kind: ``teacher`` (a teacher card) or ``model`` (a trained student; same layout).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with staged(weights) as tmp:
        save_file(state, str(tmp))
    publish(tmp, weights)
    digest = sha256_file(weights)
    params = {"arch": arch, "num_classes": len(class_names), "class_names": list(class_names),
              "preprocess": preprocess.to_dict(), "weights_sha256": digest, "metrics": metrics or {},
              **(extra or {})}
    data = mf.build(kind, stage=stage, params=params, inputs=inputs,
                    files=[{"path": WEIGHTS, "bytes": weights.stat().st_size, "sha256": digest}],
                    totals={"classes": len(class_names)})
    try:
        return mf.write(data, out)
    except ManifestError:  # a writer with the same inputs and parameters wrote the same card meanwhile
        if (out / mf.MANIFEST_NAME).is_file() and mf.load(out).id == data["id"]:
            return out / mf.MANIFEST_NAME
        raise


def load_teacher(card: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, mf.Manifest]:
    """Load a teacher card: check the weights' sha256, build the model, load the weights strictly, eval()."""
    return load_classifier(card, device, kinds=("teacher",))


def load_classifier(card: str | Path, device: str | torch.device = "cpu",
                    kinds: tuple[str, ...] = ("teacher", "model")) -> tuple[torch.nn.Module, mf.Manifest]:
    """Load a teacher or model card (weights sha256 checked first); the model is returned in eval mode.

    The module maps images to logits over the card's classes (a class-mapped card included); an ensemble card
    has no single input and is loaded with ``load_runnable``.
    """
    manifest = mf.load(card)
    if manifest.kind not in kinds:
        raise InputError(f"{manifest.path}: is a {manifest.kind!r} manifest, expected one of {kinds}")
    if is_ensemble(manifest):
        raise InputError(f"{manifest.path}: is an ensemble card; it runs in kdpipe logits (each member with its "
                         "own preprocessing), not as a single model")
    return _load_single(manifest).to(device).eval(), manifest


def _load_single(manifest: mf.Manifest) -> torch.nn.Module:
    weights = manifest.file_path(manifest.files[0])
    if sha256_file(weights) != manifest.params["weights_sha256"]:
        raise InputError(f"{weights}: sha256 differs from the teacher card {manifest.path}; refusing to load")
    model = sources.build(manifest.params)
    model.load_state_dict(load_safetensors(weights), strict=True)
    return sources.runnable(model, manifest.params)


def load_runnable(card: str | Path, device: str | torch.device = "cpu"):
    """(module, preprocessing, manifest) of any teacher or model card, for the logits stage.

    The preprocessing is a ``Preprocess`` for a single model; for an ensemble, the tuple of its members' distinct
    preprocessings, and the module takes one input per entry (``Ensemble``).
    """
    manifest = mf.load(card)
    if not is_ensemble(manifest):
        model, manifest = load_classifier(manifest.path, device)
        return model, preprocess_of(manifest), manifest
    members = ensemble_members(manifest)
    pps = preprocesses_of(manifest)
    inputs = [pps.index(preprocess_of(m)) for m in members]
    module = Ensemble([_load_single(m) for m in members], inputs, manifest.params["combine"])
    return module.to(device).eval(), pps, manifest


def is_ensemble(manifest: mf.Manifest) -> bool:
    """Whether a card is an ensemble of member cards."""
    return manifest.params.get("arch") == ENSEMBLE


def ensemble_members(manifest: mf.Manifest) -> list[mf.Manifest]:
    """An ensemble's member cards, each checked against the id the ensemble recorded."""
    members = []
    for entry in manifest.params["members"]:
        path = (Path(manifest.path).parent / entry["card"]).resolve()
        member = mf.load(path)
        if member.id != entry["id"]:
            raise InputError(f"{manifest.path}: member {path} has id {member.id[:12]}..., the ensemble was made "
                             f"with {entry['id'][:12]}...; rebuild the ensemble card")
        members.append(member)
    return members


def preprocesses_of(manifest: mf.Manifest) -> tuple[Preprocess, ...]:
    """The distinct preprocessings of a card's inputs (one for a single model), in member order."""
    if not is_ensemble(manifest):
        return (preprocess_of(manifest),)
    found = []
    for entry in manifest.params["members"]:
        pp = Preprocess.from_dict(entry["preprocess"])
        if pp not in found:
            found.append(pp)
    return tuple(found)


def preprocess_of(manifest: mf.Manifest) -> Preprocess:
    """The preprocessing recorded in a (single-model) teacher card."""
    return Preprocess.from_dict(manifest.params["preprocess"])

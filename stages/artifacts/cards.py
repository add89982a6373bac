"""Classifier cards: a folder with ``weights.safetensors`` and a ``teacher`` (or ``model``) manifest.

The card says everything a user of the logits needs to know about how the teacher saw the images:
architecture, class-index map, preprocessing, weights sha256, accuracy. Weights load only from
safetensors, or from a state dict through ``torch.load(weights_only=True)``; never plain pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline import manifest as mf
from pipeline.atomic import publish, staged
from pipeline.errors import InputError, ManifestError
from pipeline.hashing import sha256_file
from stages.imaging import Preprocess
from stages.models.classifiers import build_model

WEIGHTS = "weights.safetensors"


def load_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a state dict via ``torch.load(weights_only=True)``.

    Args:
        path: the weights file.
        expected_sha256: a pinned digest; checked before a single byte is deserialised.

    Raises ``InputError`` naming the file for anything else (a pickle that carries code is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    actual = sha256_file(path) if expected_sha256 is not None else None
    if actual is not None and actual != expected_sha256.lower():
        raise InputError(f"{path}: sha256 {actual} differs from the pinned {expected_sha256}; "
                         "refusing to load it (check the file, or the pin in your config)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: refused, never executed
        raise InputError(f"{path}: refused: not a safetensors file nor a plain tensor state dict "
                         f"loadable with weights_only=True ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
    """Load a teacher or model card (weights sha256 checked first); the model is returned in eval mode."""
    manifest = mf.load(card)
    if manifest.kind not in kinds:
        raise InputError(f"{manifest.path}: is a {manifest.kind!r} manifest, expected one of {kinds}")
    weights = manifest.file_path(manifest.files[0])
    if sha256_file(weights) != manifest.params["weights_sha256"]:
        raise InputError(f"{weights}: sha256 differs from the teacher card {manifest.path}; refusing to load")
    model = build_model(manifest.params["arch"], manifest.params["num_classes"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), manifest


def preprocess_of(manifest: mf.Manifest) -> Preprocess:
    """The preprocessing recorded in a teacher card."""
    return Preprocess.from_dict(manifest.params["preprocess"])

"""Weights files: safetensors, or a state dict through ``torch.load(weights_only=True)``; never plain pickle.

A timm training checkpoint (``{"state_dict": ...}``) is unwrapped and a DDP ``module.`` prefix dropped. Anything
else is an ``InputError`` naming the file (a pickle that carries code is refused before anything in it runs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import InputError
from pipeline.hashing import sha256_file


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; ``InputError`` naming the file when it is not one (e.g. "header too large")."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a valid safetensors file ({exc}); give the weights file itself (not a "
                         "download page, a truncated copy or another format), or re-save it with "
                         "safetensors.torch.save_file") from None


def load_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a state dict via ``torch.load(weights_only=True)``.

    Args:
        path: the weights file.
        expected_sha256: a pinned digest; checked before a single byte is deserialised.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    actual = sha256_file(path) if expected_sha256 is not None else None
    if actual is not None and actual != expected_sha256.lower():
        raise InputError(f"{path}: sha256 {actual} differs from the pinned {expected_sha256}; "
                         "refusing to load it (check the file, or the pin in your config)")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
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

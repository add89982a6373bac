"""Training checkpoints without pickle: one safetensors file per checkpoint plus an atomic pointer.

``OUT/checkpoints/step-000000123.safetensors`` holds the model tensors (``model/<name>``) and the optimizer's
tensors (``optim/<param id>/<name>``); its safetensors metadata holds, as JSON, the optimizer's other state and
param groups, the LR scheduler's state dict and the run state (step, epoch, stream positions, metrics so
far, fingerprint). The file is written to a temp name, fsynced and renamed; then ``latest.json`` (file
name, bytes, sha256) is replaced atomically. A checkpoint exists only once the pointer names it, so a kill
at any moment leaves the previous checkpoint usable. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import publish, staged, write_atomic
from pipeline.errors import IntegrityError
from pipeline.hashing import sha256_file

log = logging.getLogger(__name__)
POINTER = "latest.json"
_META = "kdpipe"


@dataclass
class Checkpoint:
    """A loaded checkpoint: model and optimizer state dicts, scheduler state, run state, and the file's
    sha256 (checked against ``latest.json`` on load)."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    state: dict
    sha256: str


def split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON-able rest."""
    tensors, plain = {}, {}
    for pid, entry in state_dict["state"].items():
        plain[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = value.detach().cpu().contiguous()
            else:
                plain[str(pid)][name] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``split_optimizer``."""
    state = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, field = name.split("/", 2)
            state.setdefault(int(pid), {})[field] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, step: int, model_state: dict, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest.json`` at it, keep the newest ``keep`` files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:09d}.safetensors"
    optim_tensors, optim_meta = split_optimizer(optimizer.state_dict())
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    tensors.update(optim_tensors)
    meta = json.dumps({"optimizer": optim_meta, "scheduler": scheduler.state_dict(), "state": state},
                      sort_keys=True, allow_nan=False)
    with staged(final) as tmp:
        save_file(tensors, str(tmp), metadata={_META: meta})
    publish(tmp, final)
    previous = _read_pointer(folder)
    history = ([final.name] + [n for n in (previous or {}).get("history", []) if n != final.name])[:keep]
    pointer = {"step": step, "file": final.name, "bytes": final.stat().st_size, "sha256": sha256_file(final),
               "history": history}
    write_atomic(folder / POINTER, json.dumps(pointer, indent=1, sort_keys=True).encode())
    for name in (previous or {}).get("history", []):
        if name not in history:
            (folder / name).unlink(missing_ok=True)
    return final


def _read_pointer(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / POINTER).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{Path(folder) / POINTER}: unreadable checkpoint pointer ({exc}); "
                             "delete it to resume from nothing") from None


def load_latest(folder: Path) -> Checkpoint | None:
    """The checkpoint ``latest.json`` names (sha256 checked), or None when there is none."""
    pointer = _read_pointer(folder)
    if pointer is None:
        return None
    path = Path(folder) / pointer["file"]
    if not path.is_file() or sha256_file(path) != pointer["sha256"]:
        raise IntegrityError(f"{path}: missing or its sha256 differs from {Path(folder) / POINTER}; "
                             "the checkpoint is damaged (delete the checkpoints folder to start over)")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[_META])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    return Checkpoint(path, model, join_optimizer(tensors, meta["optimizer"]), meta["scheduler"], meta["state"],
                      pointer["sha256"])

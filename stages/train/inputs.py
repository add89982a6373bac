"""Training inputs: dataset manifests (labeled shards, or reshard output with soft targets), stored teacher
logits joined by key, and initial weights. Everything is checked before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import manifest as mf
from pipeline.errors import InputError, ManifestError
from pipeline.hashing import sha256_file
from stages.artifacts.cards import load_classifier, load_state_dict
from stages.artifacts.logits_reader import open_logits
from stages.imaging import Preprocess
from stages.train.checkpoint import POINTER, load_latest
from stages.train.config import TrainConfig
from stages.train.data import DataPlan, check_shard_count, shard_refs


@dataclass(frozen=True)
class TrainInputs:
    """The loaded, checked inputs of one training run."""

    manifests: tuple[mf.Manifest, ...]
    logits: tuple[str | None, ...]
    class_names: tuple[str, ...]
    topk: int | None
    lineage: tuple[tuple[mf.Manifest, str], ...]
    view_preprocess: Preprocess | None = None  # the teacher's, when the soft targets carry stored views


def load_inputs(train: list[str | Path], teacher_logits: list[str | Path] | None, config: TrainConfig) -> TrainInputs:
    """Load the training manifests and their soft-target sources; refuse what the loss cannot use.

    Args:
        train: dataset manifests (labeled ingest shards, or reshard output with ``json`` soft targets).
        teacher_logits: logits manifests of the same datasets, one per ``train`` manifest, joined by key.
        config: the run's configuration (the loss decides what is needed).
    """
    manifests = [mf.load(p, kind="dataset") for p in train]
    if teacher_logits and len(teacher_logits) != len(manifests):
        raise InputError(f"--teacher-logits: give one logits manifest per --train manifest "
                         f"({len(teacher_logits)} for {len(manifests)})")
    if teacher_logits and config.loss == "hard":
        raise InputError("--teacher-logits is used by --loss soft or mix only; drop it or change the loss")
    names = _class_names(manifests, teacher_logits)
    lineage = [(m, "train") for m in manifests]
    logits_paths: list[str | None] = [None] * len(manifests)
    topks = set()
    for i, manifest in enumerate(manifests):
        if config.loss != "hard" and teacher_logits:
            logits_paths[i] = str(teacher_logits[i])
            topks.add(_check_logits(teacher_logits[i], manifest, names, lineage))
        elif config.loss != "hard":
            topks.add(_soft_targets_topk(manifest))
        if config.loss != "soft" and not manifest.params.get("labeled"):
            raise InputError(f"{manifest.path}: unlabeled; --loss {config.loss} needs labels (cls members)")
    if len(topks) > 1:
        raise InputError(f"the soft targets disagree on top-K ({sorted(topks)}); train on one kind at a time")
    return TrainInputs(tuple(manifests), tuple(logits_paths), tuple(names), topks.pop() if topks else None,
                       tuple(lineage), _view_preprocess(manifests) if config.loss != "hard" else None)


def _view_preprocess(manifests: list[mf.Manifest]) -> Preprocess | None:
    """The teacher's preprocessing of stored views (multi-view soft targets), one for all inputs, or None."""
    found = {json.dumps(m.params["soft_targets"]["preprocess"], sort_keys=True) for m in manifests
             if (m.params.get("soft_targets") or {}).get("views")}
    if len(found) > 1:
        raise InputError("the training inputs carry stored views made with different teacher preprocessing; "
                         "train on one at a time")
    return Preprocess.from_dict(json.loads(found.pop())) if found else None


def _class_names(manifests: list[mf.Manifest], teacher_logits: list[str | Path] | None) -> list[str]:
    """The class list of the labeled manifests, or of the teacher's logits for an unlabeled pool."""
    names = next((list(m.params["class_names"]) for m in manifests if m.params.get("class_names")), [])
    if not names and teacher_logits:
        names = open_logits(teacher_logits[0]).class_names  # blind distillation: the teacher's classes
    if not names:
        raise InputError(f"{manifests[0].path}: no class_names; training needs the class list (an unlabeled "
                         "pool takes it from --teacher-logits)")
    for other in manifests:
        if other.params.get("class_names") and list(other.params["class_names"]) != names:
            raise InputError(f"{other.path}: class_names differ from the other training inputs")
    return names


def _soft_targets_topk(manifest: mf.Manifest) -> int:
    soft = manifest.params.get("soft_targets")
    if not soft:
        raise InputError(f"{manifest.path}: carries no soft targets (params.soft_targets is null); use --loss "
                         "hard, or give --teacher-logits with the logits of this dataset")
    return int(soft["topk"])


def _check_logits(path, manifest: mf.Manifest, names: list[str], lineage: list) -> int:
    logits = open_logits(path)
    if logits.dataset_id != manifest.id:
        raise ManifestError(f"{logits.manifest.path}: logits of dataset {logits.dataset_id[:12]}, not of "
                            f"{manifest.path} ({manifest.id[:12]}); give the logits of this dataset")
    if logits.num_classes != len(names) or logits.num_parts != len(manifest.files):
        raise ManifestError(f"{logits.manifest.path}: {logits.num_classes} classes / {logits.num_parts} parts; "
                            f"{manifest.path} has {len(names)} classes / {len(manifest.files)} shards")
    if int(logits.views.get("count", 1)) > 1:
        raise InputError(f"{logits.manifest.path}: multi-view logits ({logits.views['count']} views) cannot be "
                         "joined by key; select and reshard them (training shards carry every view)")
    lineage.append((logits.manifest, "teacher_logits"))
    return logits.topk


def make_plan(inputs: TrainInputs, config: TrainConfig, world: int) -> DataPlan:
    """The data plan of a run (shard list, batch, streams), refusing too few shards."""
    plan = DataPlan(shards=tuple(shard_refs(list(inputs.manifests), list(inputs.logits))),
                    num_classes=len(inputs.class_names), batch_size=config.batch_size, seed=config.seed,
                    world=world, streams=max(1, config.num_workers), preprocess=config.preprocess,
                    augment=config.augment, need_label=config.loss != "soft", need_soft=config.loss != "hard",
                    topk=inputs.topk, shuffle_buffer=config.shuffle_buffer, view_preprocess=inputs.view_preprocess)
    if inputs.view_preprocess is not None and inputs.view_preprocess.size != config.preprocess.size:
        raise InputError(f"the soft targets carry stored teacher views of {inputs.view_preprocess.size} px; "
                         f"train at that size (--size {inputs.view_preprocess.size}) to replay them exactly")
    check_shard_count(plan)
    return plan


def initial_state(init: str | Path) -> tuple[dict[str, torch.Tensor], mf.Manifest | None, str]:
    """Weights to start from, their card (or None) and an identity (card id or file sha256).

    ``init`` is a teacher/model card (folder or manifest), a training output folder or its ``checkpoints``
    folder (its latest checkpoint), or a weights file (safetensors, or a weights-only state dict).
    """
    path = Path(init)
    if (path / mf.MANIFEST_NAME).is_file() or path.name == mf.MANIFEST_NAME:
        model, manifest = load_classifier(path)
        return model.state_dict(), manifest, manifest.id
    for folder in (path, path / "checkpoints"):
        if (folder / POINTER).is_file():
            checkpoint = load_latest(folder)
            return checkpoint.model, None, checkpoint.sha256  # hashed once, by load_latest
    return load_state_dict(path), None, sha256_file(path) if path.is_file() else str(path)


def load_initial(model: torch.nn.Module, init: str | Path) -> tuple[mf.Manifest | None, str]:
    """Load ``init`` into ``model`` strictly (a different head or architecture is refused, named);
    return its card (or None) and its identity."""
    state, manifest, ident = initial_state(init)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"--init {init}: its weights do not fit this model (different --arch or number of "
                         f"classes?): {' '.join(str(exc).splitlines()[:3])}") from None
    return manifest, ident


def card_defaults(init: str | Path) -> tuple[str | None, "Preprocess | None"]:
    """(arch, preprocessing) of an ``--init`` card, or (None, None) when ``init`` is not a card."""
    path = Path(init)
    if not ((path / mf.MANIFEST_NAME).is_file() or path.name == mf.MANIFEST_NAME):
        return None, None
    manifest = mf.load(path)
    if manifest.kind not in ("teacher", "model"):
        raise InputError(f"--init {init}: is a {manifest.kind!r} manifest, not a teacher or model card")
    return manifest.params["arch"], Preprocess.from_dict(manifest.params["preprocess"])

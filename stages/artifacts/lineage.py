"""Reshard inputs: the lineage selection -> logits -> dataset, and streaming reads of the selection.

The dataset is found through the manifests' ``inputs`` paths (selection role ``logits``, logits role
``data``) unless the user names it; either way its id must equal the dataset id the logits were made
from. Selection parts are checked (size, sha256) once, then scanned in record batches so memory is
bounded by the rows of the shards asked for, never by the selection's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import ManifestError
from pipeline.storage import scheme_of
from stages.artifacts.logits_reader import LogitsSet, open_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lineage:
    """The selection, the logits it was made from (None when not needed and not found), and the dataset."""

    selection: mf.Manifest
    logits: LogitsSet | None
    dataset: mf.Manifest


def input_path(manifest: mf.Manifest, role: str) -> Path | str:
    """The path of ``manifest``'s input of ``role`` (relative to its folder, or absolute, or an object URL
    when one of the two lives in object storage); ``ManifestError`` if absent."""
    for ref in manifest.inputs:
        if ref.get("role") == role and ref.get("path"):
            where = ref["path"]
            return where if scheme_of(where) or Path(where).is_absolute() else manifest.folder / where
    raise ManifestError(f"{manifest.path}: no input of role {role!r} with a path; name it explicitly")


def _input_id(manifest: mf.Manifest, role: str) -> str | None:
    return next((ref["id"] for ref in manifest.inputs if ref.get("role") == role), None)


def _open_lineage_logits(selection: mf.Manifest) -> LogitsSet:
    logits = open_logits(input_path(selection, "logits"))
    expected = selection.params.get("logits_id") or _input_id(selection, "logits")
    if logits.id != expected:
        raise ManifestError(f"{logits.manifest.path}: id {logits.id[:12]} is not the logits {expected[:12]} "
                            f"that {selection.path} was selected from (moved or recomputed?)")
    return logits


def resolve_lineage(selection_path: str | Path | mf.Manifest, data: str | Path | None = None,
                    need_logits: bool = True) -> Lineage:
    """Load the selection, its logits and its dataset (``data`` overrides the lineage), and check the ids.

    Args:
        selection_path: the selection manifest (file or folder, or already loaded).
        data: the source dataset manifest; default: the logits manifest's input of role ``data``.
        need_logits: the logits must be found (the selection lacks soft-target columns); otherwise, with
            ``data`` given, a selection whose logits cannot be found is checked against its ``dataset_id``.

    Raises:
        ManifestError: a manifest is missing, or the dataset is not the one the logits were made from.
    """
    selection = (selection_path if isinstance(selection_path, mf.Manifest)
                 else mf.load(selection_path, kind="selection"))
    try:
        logits = _open_lineage_logits(selection)
    except ManifestError as exc:
        if need_logits or data is None:
            raise
        logits = None
        log.warning("%s; checking --data against the selection's dataset_id instead", exc)
    dataset = mf.load(data if data is not None else input_path(logits.manifest, "data"), kind="dataset")
    expected = logits.dataset_id if logits is not None else selection.params.get("dataset_id")
    if dataset.id != expected:
        where = logits.manifest.path if logits is not None else selection.path
        raise ManifestError(f"dataset {dataset.path} has id {dataset.id[:12]}, but {where} was made from dataset "
                            f"{str(expected)[:12]}; pass the --data the logits were computed on")
    return Lineage(selection, logits, dataset)

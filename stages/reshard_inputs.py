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
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import IntegrityError, ManifestError
from pipeline.hashing import sha256_file
from stages.logits_reader import LogitsSet, open_logits

log = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("key", "shard", "label", "score")
TARGET_COLUMNS = ("topk_index", "topk_logit", "lse")


@dataclass(frozen=True)
class Lineage:
    """The selection, the logits it was made from (None when not needed and not found), and the dataset."""

    selection: mf.Manifest
    logits: LogitsSet | None
    dataset: mf.Manifest


def input_path(manifest: mf.Manifest, role: str) -> Path:
    """The path of ``manifest``'s input of ``role`` (relative to its folder); ``ManifestError`` if absent."""
    for ref in manifest.inputs:
        if ref.get("role") == role and ref.get("path"):
            return manifest.folder / ref["path"]
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


class SelectionRows:
    """The rows of a selection artifact, checked once, read by ranges of source shards."""

    def __init__(self, manifest: mf.Manifest, batch_rows: int = 65536):
        self.manifest = manifest
        self.batch_rows = batch_rows
        self.paths = [self._checked(entry) for entry in manifest.files]
        names = pq.ParquetFile(self.paths[0]).schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ManifestError(f"{self.paths[0]}: selection lacks column(s) {', '.join(missing)}; "
                               "give a selection written by `kdpipe select`")
        self.has_targets = all(c in names for c in TARGET_COLUMNS)
        self.has_dup = "dup" in names
        self.columns = [c for c in (*REQUIRED_COLUMNS, "dup", *TARGET_COLUMNS) if c in names]

    def _checked(self, entry: dict) -> Path:
        path = self.manifest.file_path(entry)
        if isinstance(path, str) or not path.is_file():
            raise IntegrityError(f"{path}: listed in {self.manifest.path} but not a local file")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: size or sha256 differs from {self.manifest.path}; refusing to read it")
        return path

    def _batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        for path in self.paths:
            yield from pq.ParquetFile(path).iter_batches(batch_size=self.batch_rows, columns=columns)

    def shard_counts(self, num_shards: int, num_classes: int) -> np.ndarray:
        """Selected rows per source shard; ``ManifestError`` for a shard or label out of range."""
        counts = np.zeros(num_shards, dtype=np.int64)
        for batch in self._batches(["shard", "label"]):
            shards = batch.column("shard").to_numpy(zero_copy_only=False).astype(np.int64)
            labels = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            bad = (shards < 0) | (shards >= num_shards) | (labels < 0) | (labels >= num_classes)
            if bad.any():
                row = int(np.argmax(bad))
                raise ManifestError(f"{self.manifest.path}: row with shard {shards[row]} label {labels[row]} is "
                                    f"outside the dataset's {num_shards} shards / {num_classes} classes")
            counts += np.bincount(shards, minlength=num_shards)
        total = int(counts.sum())
        if total != self.manifest.totals.get("rows", total):
            raise IntegrityError(f"{self.manifest.path}: parts hold {total} rows, totals say "
                                 f"{self.manifest.totals['rows']}")
        return counts

    def rows_in(self, low: int, high: int) -> pa.Table:
        """Every row whose source shard is in ``[low, high)``, in one streaming scan."""
        kept = []
        for batch in self._batches(self.columns):
            shard = batch.column("shard")
            mask = pc.and_(pc.greater_equal(shard, low), pc.less(shard, high))
            kept.append(batch.filter(mask))
        table = pa.Table.from_batches(kept) if kept else pa.table({c: [] for c in self.columns})
        if not self.has_dup:
            table = table.append_column("dup", pa.array(np.zeros(len(table), np.int16)))
        return table

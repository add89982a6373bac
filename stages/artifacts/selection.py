"""The selection artifact: its Parquet contract, the `kdpipe verify` check of a part, and a streaming reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import IntegrityError, ManifestError
from pipeline.verify import verify
from stages.artifacts.parquet import checksum, read_parquet, source

SCHEMA_VERSION = 1
REPORT_DIR = "report"  # the report the select stage writes beside a selection, before its manifest


def report_problems(selection: mf.Manifest) -> list[str]:
    """What is wrong with the report a selection made by ``kdpipe select`` promises (``REPORT_DIR`` beside it: a
    report manifest of this selection whose files verify); empty when it is intact or none is promised."""
    if selection.data.get("producer", {}).get("stage") != "select":
        return []
    return report_issues(selection)


def report_issues(selection: mf.Manifest) -> list[str]:
    """What is wrong with the report beside ``selection`` (missing, another selection's, a file damaged)."""
    target = selection.folder / REPORT_DIR / mf.MANIFEST_NAME
    problems = verify(target)
    if not problems and mf.load(target).params.get("selection_id") != selection.id:
        problems = [f"{target}: is the report of another selection"]
    return [f"the selection's report: {p} (rerun the select stage to write it)" for p in problems]


def check_selection_part(manifest, entry: dict, path: Path) -> list[str]:
    """``kdpipe verify`` content check of one selection part: columns, types, order, ranks, labels, scores.

    Reads the part in column chunks (the selection is O(classes x K) rows).
    """
    try:
        table = read_parquet(path, list(ORDER), "selection part")
    except IntegrityError as exc:
        return [str(exc)]
    problems = _type_problems(path, table.schema)
    if problems:
        return problems
    labels = table.column("label").to_numpy()
    rank = table.column("rank").to_numpy().astype(np.int64)
    dup = table.column("dup").to_numpy().astype(np.int64)
    score = table.column("score").to_numpy()
    num_classes = int(manifest.params["num_classes"])
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        problems.append(f"{path}: label outside [0, {num_classes})")
    if len(score) and (np.isnan(score).any() or score.min() < 0 or score.max() > 1):
        problems.append(f"{path}: score outside [0, 1]")
    order = np.lexsort((dup, rank, labels))
    if not np.array_equal(order, np.arange(len(labels))):
        problems.append(f"{path}: rows are not sorted by (label, rank, dup)")
    originals = dup == 0
    first = np.r_[True, labels[originals][1:] != labels[originals][:-1]] if originals.any() else np.zeros(0, bool)
    expected = np.arange(originals.sum()) - np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    if not np.array_equal(rank[originals], expected):
        problems.append(f"{path}: ranks of originals are not 0, 1, 2, ... within each label")
    return problems + _quota_problems(path, labels, manifest.params) + _meta_problems(path, table.schema,
                                                                                     manifest.params)


def _quota_problems(path: Path, labels: np.ndarray, params: dict) -> list[str]:
    """Rows per class (balance copies included) never exceed the manifest's ``per_class`` quota."""
    quotas = params.get("per_class")
    if not isinstance(quotas, list) or not len(labels) or labels.max() >= len(quotas):
        return []
    counts = np.bincount(labels, minlength=len(quotas))
    over = [f"class {c}: {int(counts[c])} rows > per_class {quotas[c]}" for c in np.flatnonzero(counts > quotas)]
    return [f"{path}: more rows than the manifest's quota ({', '.join(over[:5])}); the part is not this "
            "selection's (another writer's, or made with other parameters)"] if over else []


def _meta_problems(path: Path, schema: pa.Schema, params: dict) -> list[str]:
    """The part's own metadata (written by ``kdpipe select``) agrees with the manifest's params."""
    raw = (schema.metadata or {}).get(b"kdpipe")
    if raw is None:
        return []
    meta = json.loads(raw)
    return [f"{path}: metadata {k}={meta[k]!r}, the manifest says {params.get(k)!r}"
            for k in ("logits_id", "policy", "temperature", "topk", "top_p") if k in meta and meta[k] != params.get(k)]


def _type_problems(path: Path, schema: pa.Schema) -> list[str]:
    wanted = {"key": pa.string(), "shard": pa.int32(), "label": pa.int32(), "score": pa.float32(),
              "rank": pa.int32(), "dup": pa.int16()}
    return [f"{path}: column {name} is {schema.field(name).type}, expected {kind}"
            for name, kind in wanted.items() if schema.field(name).type != kind]

REQUIRED_COLUMNS = ("key", "shard", "label", "score")
TARGET_COLUMNS = ("topk_index", "topk_logit", "lse")


class SelectionRows:
    """The rows of a selection artifact, checked once, read by ranges of source shards."""

    def __init__(self, manifest: mf.Manifest, batch_rows: int = 65536):
        self.manifest = manifest
        self.batch_rows = batch_rows
        self.paths = [self._checked(entry) for entry in manifest.files]
        names = pq.ParquetFile(source(self.paths[0])).schema_arrow.names
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
            raise IntegrityError(f"{path}: listed in {self.manifest.path} but missing")
        if path.stat().st_size != entry["bytes"] or checksum(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: size or sha256 differs from {self.manifest.path}; refusing to read it")
        return path

    def _batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        for path in self.paths:
            yield from pq.ParquetFile(source(path)).iter_batches(batch_size=self.batch_rows, columns=columns)

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

    def label_counts(self, num_classes: int) -> np.ndarray:
        """Selected rows per label, in one streaming scan of the label column (memory O(classes))."""
        counts = np.zeros(num_classes, dtype=np.int64)
        for batch in self._batches(["label"]):
            labels = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            counts += np.bincount(labels, minlength=num_classes)[:num_classes]
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

ORDER = ("key", "shard", "label", "score", "rank", "dup")



"""Reading a logits artifact: open it by its manifest, check every part agrees, stream record batches.

This is the one way other stages (select, dedup, reshard, evaluate) and users read logits. Every part is
checked against the manifest before its rows are used: sha256 and size, and the Parquet metadata
(schema version, temperature, top-K, number of classes, teacher and dataset ids) equal to the manifest's.
Rows are checked as they are read (vectorised; select end to end on 2M rows is within run-to-run noise with
them): class ids in [0, C), top-K logits finite and sorted descending, keys unique within the part (per view
for multi-view parts); a part that breaks them was written wrong by its producer and is refused with
``IntegrityError`` naming the file and a key.
Reading streams record batches, so memory is bounded by ``batch_rows`` (plus one part's keys), never by the
artifact's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import IntegrityError, ManifestError
from pipeline.storage import classify
from stages.artifacts.logits_format import READ_VERSIONS, fixed_list_to_numpy, read_metadata
from stages.artifacts.parquet import checksum, open_parquet

# Parquet metadata keys that must equal the manifest's params in every part (also ``kdpipe verify``'s check).
AGREEING = ("temperature", "topk", "num_classes", "teacher_id", "dataset_id")
_CHECKED = ("key", "topk_index", "topk_logit")  # read with every request so that rows can be checked


@dataclass(frozen=True)
class LogitsSet:
    """A loaded logits artifact (manifest validated; parts checked as they are opened)."""

    manifest: mf.Manifest
    _hashed: dict = field(default_factory=dict, compare=False, repr=False)  # part -> stat of the file it hashed

    params = property(lambda self: self.manifest.params)
    id = property(lambda self: self.manifest.id)
    num_classes = property(lambda self: int(self.params["num_classes"]))
    class_names = property(lambda self: list(self.params["class_names"]))
    topk = property(lambda self: int(self.params["topk"]))
    temperature = property(lambda self: float(self.params["temperature"]))
    teacher_id = property(lambda self: self.params["teacher_id"])
    dataset_id = property(lambda self: self.params["dataset_id"])
    logit_dtype = property(lambda self: self.params.get("logit_dtype", "float32"))
    embedding_dim = property(lambda self: self.params.get("embedding_dim"))
    views = property(lambda self: dict(self.params["views"]))

    @property
    def num_parts(self) -> int:
        return len(self.manifest.files)

    def part_path(self, index: int) -> Path:
        """Local path of part ``index`` (the manifest's ``files[index]``)."""
        where = self.manifest.file_path(self.manifest.files[index])
        if isinstance(where, str):  # an external URL: a logits manifest never lists one
            raise ManifestError(f"{self.manifest.path}: logits part {where} is external; refusing it")
        return where

    def open_part(self, index: int, verify: bool = True) -> pq.ParquetFile:
        """Open part ``index`` after checking size, sha256 (when ``verify``) and metadata; raise naming it."""
        entry, path = self.manifest.files[index], self.part_path(index)
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {self.manifest.path} but missing")
        stat = path.stat()
        if stat.st_size != entry["bytes"] or (verify and not self._sha256_holds(index, path, stat, entry)):
            raise IntegrityError(f"{path}: size or sha256 differs from {self.manifest.path}; refusing to read it")
        handle = open_parquet(path, hint="; recompute it (`kdpipe verify` lists every damaged part)", pre_buffer=False)
        self._check_metadata(path, read_metadata(handle.schema_arrow), handle.metadata.num_rows, entry)
        return handle

    def _sha256_holds(self, index: int, path: Path, stat, entry: dict) -> bool:
        """The part's sha256 is the manifest's: a local file is hashed once (the same inode, size and mtime: a
        part read twice, as select's two passes do, is not hashed twice; a part replaced since is hashed again);
        an object in a bucket, whose stat has neither, every time it is opened."""
        seen = None if classify(str(path)).remote else (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen is not None and self._hashed.get(index) == seen:
            return True
        if checksum(path) != entry["sha256"]:
            return False
        if seen is not None:
            self._hashed[index] = seen
        return True

    def _check_metadata(self, path: Path, meta: dict, rows: int, entry: dict) -> None:
        if meta.get("schema_version") not in READ_VERSIONS:
            raise ManifestError(f"{path}: logits schema_version {meta.get('schema_version')!r}, "
                                f"this kdpipe reads {', '.join(map(str, READ_VERSIONS))}")
        for key in AGREEING:
            if key in meta and meta[key] != self.params[key]:
                raise ManifestError(f"{path}: metadata {key}={meta[key]!r} but {self.manifest.path} says "
                                    f"{self.params[key]!r}; parts of different runs are never mixed")
        if rows != entry.get("rows"):
            raise IntegrityError(f"{path}: {rows} rows, {self.manifest.path} says {entry.get('rows')}; the part or "
                                 "its manifest was written wrong: recompute it (`kdpipe verify` lists every damaged part)")

    def iter_batches(self, columns: list[str] | None = None, batch_rows: int = 65536,
                     parts: Iterable[int] | None = None, verify: bool = True) -> Iterator[pa.RecordBatch]:
        """Stream record batches of the given ``parts`` (default: all, in order), rows checked."""
        for index in range(self.num_parts) if parts is None else parts:
            handle, path = self.open_part(index, verify=verify), self.part_path(index)
            wanted, read = _columns(handle.schema_arrow.names, columns)
            order = KeyOrder()
            for batch in handle.iter_batches(batch_size=batch_rows, columns=read):
                order.add(check_rows(path, batch, self.num_classes, self.topk))
                yield batch.select(wanted)
            if not order.ascending:  # keys out of order: the part's keys read again, hashed once
                check_unique_keys(path, [unique_keys(handle.read(columns=_key_columns(handle)))])

    def read_part(self, index: int, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
        """One whole part as a table (a part is bounded by its shard's size), rows checked."""
        handle = self.open_part(index, verify=verify)
        wanted, read = _columns(handle.schema_arrow.names, columns)
        table = handle.read(columns=read)
        path = self.part_path(index)
        check_unique_keys(path, [check_rows(path, table, self.num_classes, self.topk)])
        return table.select(wanted)


def _columns(names: list[str], columns: list[str] | None) -> tuple[list[str], list[str]]:
    """The columns asked for, and those to read (plus what the row checks need)."""
    wanted = list(names if columns is None else columns)
    extra = [c for c in (*_CHECKED, "view") if c in names and c not in wanted]
    return wanted, wanted + extra


def check_rows(path: Path, rows: pa.RecordBatch | pa.Table, num_classes: int, topk: int) -> pa.Array:
    """Raise ``IntegrityError`` for class ids outside [0, C) or top-K logits not finite and descending.

    Returns:
        The keys that must be unique within the part (view-0 rows of a multi-view part).
    """
    index = fixed_list_to_numpy(rows.column("topk_index"), topk)
    logit = fixed_list_to_numpy(rows.column("topk_logit"), topk)
    if not _all_sound(index, logit, num_classes):  # the per-row masks only to name a faulty row
        for bad, what in row_faults(index, logit.astype(np.float32), num_classes):
            _refuse_rows(path, rows, bad, what)
    return unique_keys(rows)


def unique_keys(rows: pa.RecordBatch | pa.Table) -> pa.Array:
    """The keys that must be unique within a part: every key, or the view-0 rows' of a multi-view part."""
    keys = rows.column("key")
    if "view" in rows.schema.names:
        keys = keys.filter(pc.equal(rows.column("view"), 0))
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def _all_sound(index: np.ndarray, logit: np.ndarray, num_classes: int) -> bool:
    """``row_faults`` finds nothing: the same tests as whole-array reductions (no per-row masks)."""
    if index.size == 0:
        return True
    return bool(index.min() >= 0 and index.max() < num_classes and np.isfinite(logit).all()
                and not (logit[:, 1:] > logit[:, :-1]).any())


def row_faults(index: np.ndarray, logit: np.ndarray, num_classes: int) -> list[tuple[np.ndarray, str]]:
    """Rows no producer may write, as (mask over rows, what is wrong): class ids outside [0, C), then top-K
    logits not finite or not sorted descending. The reader refuses them; ``kdpipe verify`` lists them."""
    return [(((index < 0) | (index >= num_classes)).any(axis=1), f"class ids outside [0, {num_classes})"),
            ((np.diff(logit, axis=1) > 0).any(axis=1) | ~np.isfinite(logit).all(axis=1),
             "top-K logits not finite or not sorted descending")]


def _refuse_rows(path: Path, rows, bad: np.ndarray, what: str) -> None:
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise IntegrityError(f"{path}: {int(bad.sum())} row(s) with {what}, e.g. key "
                             f"{rows.column('key')[first].as_py()!r}; the part was written wrong: recompute it "
                             "(`kdpipe verify` lists every damaged part)")


def check_unique_keys(path: Path, keys: list[pa.Array]) -> None:
    """Raise ``IntegrityError`` naming a key that appears twice (or is null) in one part."""
    if not keys:
        return
    column = pa.chunked_array(keys, pa.string())
    if column.null_count or not (_ascending(column) or len(column.unique()) == len(column)):
        counts = pc.value_counts(column)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        name = dup[0]["values"].as_py() if len(dup) else None
        raise IntegrityError(f"{path}: key {name!r} appears more than once (or is null); keys are unique within "
                             "a part: recompute it (`kdpipe verify` lists every damaged part)")


class KeyOrder:
    """Whether a part's keys, seen batch by batch, are strictly ascending (so unique): each batch's neighbours and
    its first key against the last batch's last, no key kept (a part read in key order needs no other check)."""

    def __init__(self):
        self.ascending, self._last = True, None

    def add(self, keys: pa.Array) -> None:
        if not self.ascending or len(keys) == 0:
            return
        self.ascending = keys.null_count == 0 and _ascending(keys) and (
            self._last is None or self._last < keys[0].as_py())
        self._last = keys[-1].as_py()


def _key_columns(handle: pq.ParquetFile) -> list[str]:
    """The columns ``unique_keys`` reads."""
    return [c for c in ("key", "view") if c in handle.schema_arrow.names]


def _ascending(keys: pa.Array | pa.ChunkedArray) -> bool:
    """Keys strictly ascending (so unique): one vectorised comparison of neighbours, ~25x faster than hashing
    them with ``unique()`` (which is ~2x faster than ``count_distinct``); parts written in key order pass it."""
    if len(keys) < 2:
        return True
    flat = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    return bool(pc.all(pc.less(flat[:-1], flat[1:])).as_py())


def open_logits(path: str | Path) -> LogitsSet:
    """Load and validate a logits manifest (file or folder)."""
    return LogitsSet(mf.load(path, kind="logits"))


def check_compatible(sets: list[LogitsSet]) -> None:
    """Refuse logits artifacts that disagree on temperature, top-K, classes or teacher, naming them."""
    first = sets[0]
    for other in sets[1:]:
        for key in ("temperature", "topk", "num_classes", "teacher_id", "parquet_schema_version"):
            if other.params.get(key) != first.params.get(key):
                raise ManifestError(f"{other.manifest.path}: {key}={other.params.get(key)!r} differs from "
                                    f"{first.manifest.path} ({first.params.get(key)!r}); cannot combine them")

"""Reading a logits artifact: open it by its manifest, check every part agrees, stream record batches.

This is the one way other stages (select, dedup, reshard, evaluate) and users read logits. Every part is
checked against the manifest before its rows are used: sha256 and size, and the Parquet metadata
(schema version, temperature, top-K, number of classes, teacher and dataset ids) equal to the manifest's.
Reading streams record batches, so memory is bounded by ``batch_rows``, never by the artifact's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import IntegrityError, ManifestError
from pipeline.hashing import sha256_file
from stages.logits_format import SCHEMA_VERSION, read_metadata

# Parquet metadata keys that must equal the manifest's params in every part.
_AGREEING = ("temperature", "topk", "num_classes", "teacher_id", "dataset_id")


@dataclass(frozen=True)
class LogitsSet:
    """A loaded logits artifact (manifest validated; parts checked as they are opened)."""

    manifest: mf.Manifest

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
        if isinstance(where, str):
            raise ManifestError(f"{self.manifest.path}: remote logits parts ({where}) are not supported yet")
        return where

    def open_part(self, index: int, verify: bool = True) -> pq.ParquetFile:
        """Open part ``index`` after checking size, sha256 (when ``verify``) and metadata; raise naming it."""
        entry, path = self.manifest.files[index], self.part_path(index)
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {self.manifest.path} but missing")
        if path.stat().st_size != entry["bytes"] or (verify and sha256_file(path) != entry["sha256"]):
            raise IntegrityError(f"{path}: size or sha256 differs from {self.manifest.path}; refusing to read it")
        try:
            handle = pq.ParquetFile(path)
        except Exception as exc:  # a cut footer raises ArrowInvalid and friends
            raise IntegrityError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        self._check_metadata(path, read_metadata(handle.schema_arrow), handle.metadata.num_rows, entry)
        return handle

    def _check_metadata(self, path: Path, meta: dict, rows: int, entry: dict) -> None:
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"{path}: logits schema_version {meta.get('schema_version')!r}, "
                                f"this kdpipe reads {SCHEMA_VERSION}")
        for key in _AGREEING:
            if key in meta and meta[key] != self.params[key]:
                raise ManifestError(f"{path}: metadata {key}={meta[key]!r} but {self.manifest.path} says "
                                    f"{self.params[key]!r}; parts of different runs are never mixed")
        if rows != entry.get("rows"):
            raise IntegrityError(f"{path}: {rows} rows, the manifest says {entry.get('rows')}")

    def iter_batches(self, columns: list[str] | None = None, batch_rows: int = 65536,
                     parts: Iterable[int] | None = None, verify: bool = True) -> Iterator[pa.RecordBatch]:
        """Stream record batches of the given ``parts`` (default: all, in order)."""
        for index in range(self.num_parts) if parts is None else parts:
            handle = self.open_part(index, verify=verify)
            yield from handle.iter_batches(batch_size=batch_rows, columns=columns)

    def read_part(self, index: int, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
        """One whole part as a table (a part is bounded by its shard's size)."""
        return self.open_part(index, verify=verify).read(columns=columns)


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

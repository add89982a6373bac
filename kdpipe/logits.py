"""``open_logits(M)``: a logits artifact in your own code: batches as Arrow, NumPy or torch, joins by key, and
soft targets at any temperature.

A thin layer over ``stages.artifacts.logits_reader`` (the reader every stage uses): each part is checked
against the manifest (size, sha256, Parquet metadata) and its rows (class ids in range, logits sorted) before
they are handed out; memory is bounded by ``batch_rows``, never by the artifact's size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdpipe.targets import COLUMNS, soft_targets
from pipeline import manifest as mf
from pipeline.errors import InputError, ManifestError
from stages.artifacts import logits_reader
from stages.artifacts.lineage import input_path
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.targets import Sparse

FORMATS = ("arrow", "numpy", "torch")
JOINS = ("inner", "left")


class Logits:
    """An opened logits artifact (manifest validated; parts checked as they are read)."""

    def __init__(self, logits_set: logits_reader.LogitsSet):
        self.set = logits_set
        self._shards: dict[str, int] | None = None

    manifest = property(lambda self: self.set.manifest)
    id = property(lambda self: self.set.id)
    num_classes = property(lambda self: self.set.num_classes)
    class_names = property(lambda self: self.set.class_names)
    topk = property(lambda self: self.set.topk)
    temperature = property(lambda self: self.set.temperature)
    num_parts = property(lambda self: self.set.num_parts)
    num_rows = property(lambda self: int(self.set.manifest.totals["rows"]))

    def __repr__(self) -> str:
        return (f"Logits({str(self.manifest.path)!r}: {self.num_rows} rows, C={self.num_classes}, "
                f"K={self.topk}, T={self.temperature})")

    def batches(self, columns: list[str] | None = None, *, format: str = "arrow", batch_rows: int = 65536,
                parts: Iterable[int] | None = None) -> Iterator[Any]:
        """Record batches of the given ``parts`` (default all, in order) as ``arrow`` (``pyarrow.RecordBatch``),
        ``numpy`` (dict of arrays; list columns as 2-D) or ``torch`` (dict of tensors; keys stay a list)."""
        if format not in FORMATS:
            raise InputError(f"format {format!r}: use one of {', '.join(FORMATS)}")
        for batch in self.set.iter_batches(columns, batch_rows=batch_rows, parts=parts):
            yield batch if format == "arrow" else to_numpy(batch) if format == "numpy" else to_torch(batch)

    def read_part(self, index: int, columns: list[str] | None = None) -> pa.Table:
        """Part ``index`` (= dataset shard ``index``) as one checked table."""
        return self.set.read_part(index, columns)

    def soft_targets(self, rows: Any, temperature: float | None = None, *, dense: bool = True,
                     policy: str = "exact") -> np.ndarray | Sparse:
        """``kdpipe.soft_targets`` of ``rows`` with this artifact's C and stored T."""
        return soft_targets(rows, temperature, dense=dense, policy=policy, num_classes=self.num_classes,
                            stored_temperature=self.temperature)

    def join(self, table: Any, on: str = "key", how: str = "inner",
             columns: tuple[str, ...] = COLUMNS) -> pa.Table:
        """``table`` (anything ``pyarrow.table`` takes) with this artifact's ``columns`` of the row whose key
        equals ``table[on]``, in ``table``'s order: ``inner`` drops rows without logits, ``left`` keeps them
        with nulls. Multi-view artifacts join their centre view (view 0). Memory: the rows asked for."""
        if how not in JOINS:
            raise InputError(f"join how={how!r}: use one of {', '.join(JOINS)}")
        table = table if isinstance(table, pa.Table) else pa.table(table)
        clash = [c for c in columns if c in table.column_names]
        if on not in table.column_names or clash:
            raise InputError(f"join: the table needs column {on!r} and none of {clash} (pass columns=...)")
        wanted = table.column(on).cast(pa.string())
        found = self._rows_with_keys(pc.unique(wanted), [c for c in columns if c != "key"])
        position = pc.index_in(wanted, value_set=found.column("key").combine_chunks())
        if how == "inner":
            valid = pc.is_valid(position)
            table, position = table.filter(valid), position.filter(valid)
        taken = found.take(position)
        for name in columns:
            table = table.append_column(name, taken.column(name))
        return table

    def _rows_with_keys(self, keys: pa.Array, columns: list[str]) -> pa.Table:
        names = pq.read_schema(self.set.part_path(0)).names if self.num_parts else []
        read = ["key", *columns] + (["view"] if "view" in names else [])
        kept = []
        for batch in self.set.iter_batches(read):
            mask = pc.is_in(batch.column("key"), value_set=keys)
            if "view" in read:
                mask = pc.and_(mask, pc.equal(batch.column("view"), 0))
            kept.append(pa.Table.from_batches([batch.filter(mask).select(["key", *columns])]))
        if not kept:
            raise ManifestError(f"{self.manifest.path}: the artifact has no parts")
        return pa.concat_tables(kept)

    def part_of(self, shard: str) -> int:
        """The part index of a dataset shard given by path or URL (e.g. a sample's ``__url__``), through the
        dataset the logits were made from (lineage input ``data``); ``InputError`` when it is none of them."""
        if self._shards is None:
            self._shards = self._dataset_shards()
        index = self._shards.get(_normal(shard))
        if index is None:
            raise InputError(f"{shard}: not a shard of the dataset {self.set.dataset_id[:12]} that "
                             f"{self.manifest.path} was computed on; join logits with the shards they were made from")
        return index

    def _dataset_shards(self) -> dict[str, int]:
        data = mf.load(input_path(self.manifest, "data"), kind="dataset")
        if data.id != self.set.dataset_id:
            raise ManifestError(f"{data.path}: id {data.id[:12]} is not the dataset {self.set.dataset_id[:12]} of "
                                f"{self.manifest.path} (moved or recomputed?)")
        return {_normal(data.file_path(entry)): i for i, entry in enumerate(data.files)}


def _normal(where: str | Path) -> str:
    """A shard's identity for matching: the URL as given, a local path resolved."""
    text = str(where)
    return text if "://" in text else os.path.realpath(text)


def open_logits(manifest: str | Path) -> Logits:
    """Open a logits artifact by its manifest (file or folder; kept as an absolute path, so the object works
    from any working directory and in DataLoader workers); ``ManifestError`` naming what is wrong."""
    return Logits(logits_reader.open_logits(Path(manifest).absolute()))


def to_numpy(batch: pa.RecordBatch | pa.Table) -> dict[str, np.ndarray]:
    """Columns as NumPy: fixed-size lists (top-K, embeddings) as 2-D arrays, strings as object arrays."""
    out = {}
    for name in batch.schema.names:
        column, kind = batch.column(name), batch.schema.field(name).type
        if pa.types.is_fixed_size_list(kind):
            out[name] = fixed_list_to_numpy(column, kind.list_size)
        else:
            out[name] = np.asarray(column.to_numpy(zero_copy_only=False))
    return out


def to_torch(batch: pa.RecordBatch | pa.Table) -> dict[str, Any]:
    """Columns as torch tensors (imports torch); string columns stay Python lists."""
    import torch

    return {name: values.tolist() if values.dtype == object else torch.from_numpy(np.array(values))
            for name, values in to_numpy(batch).items()}

"""Writing one logits part: accumulated rows of a shard -> a Parquet file per the logits contract.

Layout choices (measured, see the benchmark): zstd level 9, ``key`` delta-encoded (keys of a shard share long
prefixes), ``shard`` and ``topk_index`` dictionary-encoded (one value per part; at most C ids), ``lse`` (and
float32 logits) byte-stream-split, fixed-size lists for top-K and embeddings so that DuckDB/Polars/pandas read
them as arrays (every encoding here is one DuckDB 2.0 reads). K=10, C=1000, 10k rows: 29 B/img with float16
logits, 45 B/img with float32. Row groups hold ``ROW_GROUP_ROWS`` rows (a whole shard of
typical size), fixed so that the bytes depend on the rows only. Every option here is deterministic: the same
rows give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.artifacts.logits_format import LSE1, SCHEMA_VERSION, arrow_schema

ROW_GROUP_ROWS = 1 << 16
ZSTD_LEVEL = 9
LOGIT_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


@dataclass
class PartRows:
    """Rows of one part, in shard order, appended one compute batch at a time."""

    keys: list[str] = field(default_factory=list)
    index: list[np.ndarray] = field(default_factory=list)
    logit: list[np.ndarray] = field(default_factory=list)
    lse: list[np.ndarray] = field(default_factory=list)
    lse1: list[np.ndarray] = field(default_factory=list)  # logsumexp(z) at T = 1 (schema version 2)
    embedding: list[np.ndarray] = field(default_factory=list)
    views: list = field(default_factory=list)  # stages.views.View per row (multi-view logits only)

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, keys: list[str], index: np.ndarray, logit: np.ndarray, lse: np.ndarray,
               embedding: np.ndarray | None, views: list | None = None, lse1: np.ndarray | None = None) -> None:
        """Add rows (already in shard order, non-finite rows removed); ``views`` for multi-view rows;
        ``lse1`` the T = 1 normalisers (written when ``part_table(..., lse1=True)``)."""
        self.keys += keys
        self.index.append(index)
        self.logit.append(logit)
        self.lse.append(lse)
        if lse1 is not None:
            self.lse1.append(lse1)
        if embedding is not None:
            self.embedding.append(embedding)
        if views and views[0] is not None:
            self.views += views


def _fixed_list(values: list[np.ndarray], width: int, dtype: np.dtype, arrow_type: pa.DataType) -> pa.Array:
    flat = np.concatenate(values).astype(dtype).ravel() if values else np.empty(0, dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, arrow_type), width)


def _float32(values: list[np.ndarray]) -> pa.Array:
    return pa.array(np.concatenate(values).astype(np.float32) if values else np.empty(0, np.float32))


def part_table(rows: PartRows, shard: int, *, num_classes: int, topk: int, logit_dtype: str,
               embedding_dim: int | None, metadata: dict, lse1: bool = False) -> pa.Table:
    """The Arrow table of one part (schema from ``logits_format.arrow_schema``, metadata attached);
    ``lse1``: write the T = 1 normaliser column (every row must have one)."""
    schema = arrow_schema(num_classes, topk, embedding_dim, LOGIT_TYPES[logit_dtype], metadata, lse1=lse1)
    index_type = schema.field("topk_index").type.value_type
    columns = [
        pa.array(rows.keys, pa.string()),
        pa.array(np.full(len(rows), shard, np.int32)),
        _fixed_list(rows.index, topk, index_type.to_pandas_dtype(), index_type),
        _fixed_list(rows.logit, topk, np.dtype(logit_dtype), LOGIT_TYPES[logit_dtype]),
        _float32(rows.lse),
    ]
    if lse1:
        if sum(len(v) for v in rows.lse1) != len(rows):
            raise ValueError(f"part_table: {len(rows)} rows but {sum(len(v) for v in rows.lse1)} lse1 values")
        columns.append(_float32(rows.lse1))
    if embedding_dim:
        columns.append(_fixed_list(rows.embedding, embedding_dim, np.float16, pa.float16()))
    return pa.Table.from_arrays(columns, schema=schema)


def write_part(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` with the stage's fixed Parquet options."""
    encodings = {"key": "DELTA_BYTE_ARRAY", "lse": "BYTE_STREAM_SPLIT"}
    if LSE1 in table.schema.names:
        encodings[LSE1] = "BYTE_STREAM_SPLIT"
    if table.schema.field("topk_logit").type.value_type == pa.float32():
        encodings["topk_logit.list.element"] = "BYTE_STREAM_SPLIT"  # DuckDB 2.0 reads it for FLOAT, not float16
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd", compression_level=ZSTD_LEVEL,
                   use_dictionary=["shard", "topk_index.list.element"], column_encoding=encodings,
                   write_statistics=["key", "shard", "lse"], store_schema=True)

CODE_VERSION = "logits-2"  # 2: every part carries lse1 (logits schema version 2)


def part_metadata(params: dict, shard: int) -> dict:
    """The Parquet file metadata of part ``shard`` (what a reader of the file alone needs to trust it)."""
    keep = ("temperature", "topk", "num_classes", "teacher_id", "dataset_id", "logit_dtype", "views",
            "preprocess", "embedding_dim", "compute_batch", "compute")
    return {"schema_version": SCHEMA_VERSION, "shard": shard, "code_version": CODE_VERSION,
            **{k: params[k] for k in keep}}

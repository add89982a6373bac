"""Deterministic Parquet writing shared by the stages that write tables (selection, exclusion)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 1 << 20


def write_parquet(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Deterministic Parquet write (fixed row groups; no dictionary or statistics for keys, they are unique)."""
    others = [c for c in table.column_names if c not in ("key", "matched_key")]
    pq.write_table(table, path, compression=compression, row_group_size=ROW_GROUP, write_statistics=others,
                   use_dictionary=others)

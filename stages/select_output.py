"""The selection Parquet: final table (rank, balance copies), writing, and the ``kdpipe verify`` content check.

Columns: ``key`` string, ``shard`` int32, ``label`` int32, ``score`` float32, ``rank`` int32 (0-based
within its label; score descending, ties by key ascending), ``dup`` int16 (0 = original, k = k-th balance
copy), and with soft targets ``topk_index``, ``topk_logit``, ``lse`` in the logits' types. Rows are sorted
by (label, rank, dup). An image selected for several classes has one row per label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.select_policy import SelectSpec, balance_plan

SCHEMA_VERSION = 1
BASE_COLUMNS = ("key", "shard")
SOFT_COLUMNS = ("topk_index", "topk_logit", "lse")
ORDER = ("key", "shard", "label", "score", "rank", "dup")
ROW_GROUP = 1 << 20


def payload_columns(soft_targets: bool) -> list[str]:
    """Logits columns carried with every candidate."""
    return list(BASE_COLUMNS) + (list(SOFT_COLUMNS) if soft_targets else [])


def write_parquet(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Deterministic Parquet write (fixed row groups; no dictionary or statistics for keys, they are unique)."""
    others = [c for c in table.column_names if c not in ("key", "matched_key")]
    pq.write_table(table, path, compression=compression, row_group_size=ROW_GROUP, write_statistics=others,
                   use_dictionary=others)


def final_table(top: pa.Table, spec: SelectSpec, meta: dict) -> pa.Table:
    """Ranks and balance copies for ``top`` (exact per-class rows in (label, score desc, key asc) order)."""
    labels = top.column("label").to_numpy()
    counts = np.bincount(labels, minlength=len(spec.quotas)) if len(labels) else np.zeros(len(spec.quotas), int)
    starts = np.cumsum(counts) - counts
    rank = (np.arange(len(labels)) - starts[labels]).astype(np.int32)
    dup = np.zeros(len(labels), np.int16)
    if spec.balance:
        repeats, dup = balance_plan(counts, np.asarray(spec.quotas))
        rows = np.repeat(np.arange(len(labels)), repeats)
        top, rank = top.take(pa.array(rows)), rank[rows]
    columns = {name: top.column(name) for name in ("key", "shard", "label", "score")}
    columns["rank"] = pa.array(rank, pa.int32())
    columns["dup"] = pa.array(dup, pa.int16())
    if spec.soft_targets:
        columns.update({name: top.column(name) for name in SOFT_COLUMNS})
    table = pa.table(columns)
    return table.replace_schema_metadata({b"kdpipe": json.dumps(meta, sort_keys=True).encode()})


def check_selection_part(manifest, entry: dict, path: Path) -> list[str]:
    """``kdpipe verify`` content check of one selection part: columns, types, order, ranks, labels, scores.

    Reads the part in column chunks (the selection is O(classes x K) rows).
    """
    try:
        table = pq.read_table(path, columns=list(ORDER))
    except Exception as exc:  # a damaged file may raise anything from its reader
        return [f"{path}: unreadable selection part ({type(exc).__name__}: {exc})"]
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
    return problems


def _type_problems(path: Path, schema: pa.Schema) -> list[str]:
    wanted = {"key": pa.string(), "shard": pa.int32(), "label": pa.int32(), "score": pa.float32(),
              "rank": pa.int32(), "dup": pa.int16()}
    return [f"{path}: column {name} is {schema.field(name).type}, expected {kind}"
            for name, kind in wanted.items() if schema.field(name).type != kind]


CHECKS = {"selection": check_selection_part}

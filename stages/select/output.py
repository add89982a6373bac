"""The selection Parquet: final table (rank, balance copies), writing, and the ``kdpipe verify`` content check.

Columns: ``key`` string, ``shard`` int32, ``label`` int32, ``score`` float32, ``rank`` int32 (0-based
within its label; score descending, ties by key ascending), ``dup`` int16 (0 = original, k = k-th balance
copy), and with soft targets ``topk_index``, ``topk_logit``, ``lse`` in the logits' types. Rows are sorted
by (label, rank, dup). An image selected for several classes has one row per label.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from stages.artifacts.arrays import to_arrow, to_numpy
from stages.select.policy import SelectSpec, balance_plan

BASE_COLUMNS = ("key", "shard")
SOFT_COLUMNS = ("topk_index", "topk_logit", "lse")


def payload_columns(soft_targets: bool) -> list[str]:
    """Logits columns carried with every candidate."""
    return list(BASE_COLUMNS) + (list(SOFT_COLUMNS) if soft_targets else [])


def final_table(top: pa.Table, spec: SelectSpec, meta: dict) -> pa.Table:
    """Ranks and balance copies for ``top`` (exact per-class rows in (label, score desc, key asc) order)."""
    labels = to_numpy(top.column("label"))
    counts = np.bincount(labels, minlength=len(spec.quotas)) if len(labels) else np.zeros(len(spec.quotas), int)
    starts = np.cumsum(counts) - counts
    rank = (np.arange(len(labels)) - starts[labels]).astype(np.int32)
    dup = np.zeros(len(labels), np.int16)
    if spec.balance:
        repeats, dup = balance_plan(counts, np.asarray(spec.quotas))
        rows = np.repeat(np.arange(len(labels)), repeats)
        top, rank = top.take(to_arrow(rows)), rank[rows]
    columns = {name: top.column(name) for name in ("key", "shard", "label", "score")}
    columns["rank"] = to_arrow(rank, pa.int32())
    columns["dup"] = to_arrow(dup, pa.int16())
    if spec.soft_targets:
        columns.update({name: top.column(name) for name in SOFT_COLUMNS})
    table = pa.table(columns)
    return table.replace_schema_metadata({b"kdpipe": json.dumps(meta, sort_keys=True).encode()})


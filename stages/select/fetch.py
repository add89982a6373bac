"""The second pass of a select map task: the payload columns of its surviving candidates, read back by row id.

The first pass ranks candidates by numbers alone (``ScoreTopK``: label, score, row id); only the few rows that
survive it (the per-class top K_l and the ties at the boundary) need their key, shard and soft targets.
They are read here from their logits parts, row group by row group (groups without a survivor are skipped),
a batch at a time, so memory is the survivors' payload plus one batch. Each part is opened through
``LogitsSet.open_part`` again (size, sha256 and metadata): the bytes are those the first pass checked.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.artifacts.logits_reader import LogitsSet

ROW_BITS = 32  # a row id is (logits part << 32) + row within the part


def fetch_payload(logits_set: LogitsSet, ids: np.ndarray, schema: pa.Schema, id_column: str,
                  batch_rows: int) -> pa.Table:
    """The ``schema`` columns (all but ``id_column``) of the rows ``ids`` (ascending), with ``id_column``."""
    columns = [name for name in schema.names if name != id_column]
    parts, rows = ids >> ROW_BITS, ids & ((1 << ROW_BITS) - 1)
    batches = []
    for part in np.unique(parts):
        lo, hi = np.searchsorted(parts, [part, part + 1])
        batches += _part_rows(logits_set, int(part), rows[lo:hi], columns, batch_rows)
    payload = pa.Table.from_batches(batches, schema.remove(schema.get_field_index(id_column)))
    return payload.append_column(schema.field(id_column), pa.array(ids, pa.int64()))


def _part_rows(logits_set: LogitsSet, part: int, rows: np.ndarray, columns: list[str],
               batch_rows: int) -> list[pa.RecordBatch]:
    """The ``columns`` of ``rows`` (ascending) of logits part ``part``, as record batches."""
    handle = logits_set.open_part(part)
    out, start = [], 0
    for group in range(handle.metadata.num_row_groups):
        size = handle.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(rows, [start, start + size])
        if hi > lo:
            offset = start
            for batch in handle.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                a, b = np.searchsorted(rows, [offset, offset + batch.num_rows])
                if b > a:
                    out.append(batch.take(pa.array(rows[a:b] - offset)))
                offset += batch.num_rows
        start += size
    return out

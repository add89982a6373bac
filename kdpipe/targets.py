"""``soft_targets``: teacher distributions at any temperature from stored top-K rows, from whatever holds them.

Rows come as an Arrow table or record batch (``open_logits(M).batches()``, a selection part, DuckDB's
``.arrow()``, anything ``pyarrow.table`` takes: pandas, Polars), a mapping of arrays, or one reshard sample's
``json`` record. C and the stored T come from the arguments, else from the rows (a sample's ``json`` carries
``temperature`` and ``num_classes``; a logits part's Parquet metadata carries both). The maths and the exact
meaning at T' != T are ``stages.artifacts.targets``' (docs/api.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from stages.artifacts.logits_format import read_metadata
from stages.artifacts.targets import Sparse, check_policy, dense_at, sparse_targets

COLUMNS = ("topk_index", "topk_logit", "lse")


def soft_targets(rows: Any, temperature: float | None = None, *, dense: bool = True, policy: str = "exact",
                 num_classes: int | None = None, stored_temperature: float | None = None) -> np.ndarray | Sparse:
    """Teacher targets of ``rows`` at ``temperature`` (default: the stored T).

    Args:
        rows: Arrow table/batch (or what ``pyarrow.table`` takes) with ``topk_index``, ``topk_logit``, ``lse``;
            a mapping of those as arrays; or one sample's ``json`` record (lists, one row).
        temperature: T' of the targets; default the stored T (then exactly the trainer's targets).
        dense: (N, C) float32 probabilities; else ``Sparse(indices, probs, residual)``.
        policy: ``exact`` (the residual mass kept, spread evenly over the other classes) or ``renorm``.
        num_classes: C (default: from the rows' metadata or record).
        stored_temperature: the T the rows were stored at (default: from the rows' metadata or record).

    Returns:
        (N, C) array, or ``Sparse`` of (N, K), (N, K), (N,); one record gives (C,), or (K,), (K,), ().
    """
    check_policy(policy)
    index, logit, lse, meta, single = _columns(rows)
    classes = _given("num_classes", num_classes, meta)
    stored = _given("temperature", stored_temperature, meta)
    if index.size and (index.min() < 0 or index.max() >= int(classes)):
        raise InputError(f"soft_targets: class ids outside [0, {int(classes)}); is num_classes right?")
    if dense:
        out = dense_at(index, logit, lse, stored, int(classes), temperature, policy)
        return out[0] if single else out
    out = sparse_targets(index, logit, lse, stored, int(classes), temperature, policy)
    return Sparse(out.indices[0], out.probs[0], out.residual[0]) if single else out


def _given(name: str, value: Any, meta: dict) -> Any:
    found = value if value is not None else meta.get(name)
    if found is None:
        arg = "stored_temperature" if name == "temperature" else name
        raise InputError(f"soft_targets: {name} is not in these rows' metadata; pass {arg}= (`kdpipe show M` "
                         "prints it)")
    return found


def _columns(rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, bool]:
    """(topk_index (N, K), topk_logit (N, K), lse (N,), metadata, one record?) of any supported ``rows``."""
    if isinstance(rows, Mapping):
        return _from_mapping(rows)
    table = rows if isinstance(rows, (pa.Table, pa.RecordBatch)) else pa.table(rows)
    missing = [c for c in COLUMNS if c not in table.schema.names]
    if missing:
        raise InputError(f"soft_targets: rows lack column(s) {', '.join(missing)} (have {table.schema.names})")
    meta = read_metadata(table.schema)
    index, logit = (_matrix(table.column(c)) for c in COLUMNS[:2])
    lse = table.column("lse").to_numpy(zero_copy_only=False) if len(table) else np.zeros(0, np.float32)
    return index, logit, np.asarray(lse), meta, False


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list or fixed-size list column of equal-length rows as a 2-D array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise InputError("soft_targets: top-K lists of different lengths in one batch")
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(len(column), int(lengths[0]))


def _from_mapping(rows: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, bool]:
    missing = [c for c in COLUMNS if c not in rows]
    if missing:
        raise InputError(f"soft_targets: record lacks {', '.join(missing)} (has {sorted(rows)})")
    index, logit = np.asarray(rows["topk_index"]), np.asarray(rows["topk_logit"], dtype=np.float64)
    single = index.ndim == 1
    meta = {k: rows[k] for k in ("temperature", "num_classes") if np.ndim(rows.get(k)) == 0 and k in rows}
    lse = np.atleast_1d(np.asarray(rows["lse"], dtype=np.float64))
    return np.atleast_2d(index), np.atleast_2d(logit), lse, meta, single

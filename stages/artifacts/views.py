"""The multi-view row layout of logits parts, and the reduction of a key's views to one selection score.

A multi-view part has one row per (key, view): rows in shard order, and for each key its views 0..V-1
consecutively. On top of ``stages.logits_format.arrow_schema`` it adds:

| column | type | meaning |
| --- | --- | --- |
| ``view`` | int16 | view index (0 = centre view) |
| ``view_box`` | fixed_size_list<float32>[4] | crop box (left, top, right, bottom), original pixels |
| ``view_flip`` | bool | horizontal flip |
| ``view_partner`` | string, nullable | key (same shard) of the mixup partner |
| ``view_lambda`` | float32 | weight of the row's own image in the mix (1.0 without mixup) |

The augmentation spec is also in the part's schema metadata (``kdpipe.views``), so a part is
self-describing. Selection reduces the rows of one key to one distribution (``key_probs``).
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import IntegrityError
from stages.artifacts.logits_format import dense_targets, fixed_list_to_numpy
from stages.views.render import View
from stages.views.spec import AugSpec

VIEWS_META_KEY = b"kdpipe.views"
VIEW_COLUMNS = ("view", "view_box", "view_flip", "view_partner", "view_lambda")
REDUCTIONS = ("centre", "mean")


def view_fields() -> list[pa.Field]:
    """The five Arrow fields of the view parameters."""
    return [
        pa.field("view", pa.int16(), nullable=False),
        pa.field("view_box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("view_flip", pa.bool_(), nullable=False),
        pa.field("view_partner", pa.string(), nullable=True),
        pa.field("view_lambda", pa.float32(), nullable=False),
    ]


def multiview_schema(base: pa.Schema, spec: AugSpec) -> pa.Schema:
    """``base`` (from ``logits_format.arrow_schema``) plus the view fields and ``kdpipe.views`` metadata."""
    schema = base
    for field in view_fields():
        schema = schema.append(field)
    meta = dict(base.metadata or {})
    meta[VIEWS_META_KEY] = json.dumps(spec.to_dict(), sort_keys=True).encode()
    return schema.with_metadata(meta)


def is_multiview(schema: pa.Schema) -> bool:
    """True when ``schema`` carries the view columns."""
    return all(name in schema.names for name in VIEW_COLUMNS)


def spec_of(schema: pa.Schema) -> AugSpec | None:
    """The augmentation spec stored in a part's metadata, or None for a single-view part."""
    raw = (schema.metadata or {}).get(VIEWS_META_KEY)
    return AugSpec.from_dict(json.loads(raw)) if raw else None


def view_arrays(views: Sequence[View]) -> dict[str, pa.Array]:
    """The view columns for ``views`` (one per row, in row order)."""
    boxes = np.asarray([v.box for v in views], dtype=np.float32).reshape(-1)
    return {
        "view": pa.array(np.asarray([v.index for v in views], dtype=np.int16)),
        "view_box": pa.FixedSizeListArray.from_arrays(pa.array(boxes, pa.float32()), 4),
        "view_flip": pa.array([v.flip for v in views], pa.bool_()),
        "view_partner": pa.array([v.partner for v in views], pa.string()),
        "view_lambda": pa.array(np.asarray([v.lam for v in views], dtype=np.float32)),
    }


def with_views(table: pa.Table, views: Sequence[View], spec: AugSpec) -> pa.Table:
    """A base logits table (one row per (key, view)) with the view columns appended, typed by the layout."""
    if table.num_rows != len(views):
        raise ValueError(f"with_views: {table.num_rows} rows but {len(views)} views")
    schema = multiview_schema(table.schema, spec)
    columns = {name: table.column(name) for name in table.schema.names} | view_arrays(views)
    return pa.Table.from_pydict(columns, schema=schema)


def views_from_table(table: pa.Table | pa.RecordBatch) -> list[View]:
    """The ``View`` of every row of a multi-view table or batch (exactly the stored float32 values)."""
    if not is_multiview(table.schema):
        raise IntegrityError(f"logits rows have no view columns (need {', '.join(VIEW_COLUMNS)})")
    index = table.column("view").to_numpy()
    boxes = fixed_list_to_numpy(table.column("view_box"), 4).astype(np.float64)
    flips = table.column("view_flip").to_pylist()
    partners = table.column("view_partner").to_pylist()
    lams = table.column("view_lambda").to_numpy().astype(np.float64)
    return [View(int(index[i]), tuple(boxes[i].tolist()), bool(flips[i]), partners[i], float(lams[i]))
            for i in range(len(index))]


def view_record(view: View, topk_index: Sequence[int], topk_logit: Sequence[float], lse: float) -> dict:
    """One entry of a training sample's ``json["views"]``: the view's parameters and its targets."""
    return {**view.to_json(), "topk_index": [int(i) for i in topk_index],
            "topk_logit": [float(z) for z in topk_logit], "lse": float(lse)}


def iter_key_groups(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Re-chunk record batches so that no key's rows are split between two batches (memory: one batch)."""
    carry: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        table = table if carry is None else pa.concat_tables([carry, table])
        keys = table.column("key")
        if table.num_rows == 0:
            continue
        last = keys[table.num_rows - 1]
        cut = table.num_rows
        while cut > 0 and keys[cut - 1] == last:
            cut -= 1
        if cut:
            yield from table.slice(0, cut).combine_chunks().to_batches()
        carry = table.slice(cut)
    if carry is not None and carry.num_rows:
        yield from carry.combine_chunks().to_batches()


def key_probs(batch: pa.RecordBatch | pa.Table, temperature: float, num_classes: int,
              how: str = "centre") -> tuple[list[str], np.ndarray, np.ndarray]:
    """One softened distribution per key from its view rows: ``(keys, shards, probs (n_keys, C))``.

    ``centre`` uses view 0's row (the single-view score); ``mean`` averages the dense distributions
    (``dense_targets``, residual mass spread evenly) of all the key's views. Rows of one key must be
    consecutive and all in ``batch`` (use ``iter_key_groups``). A single-view batch counts as view 0.
    """
    if how not in REDUCTIONS:
        raise ValueError(f"view reduction {how!r} is not one of {REDUCTIONS}")
    keys = batch.column("key").to_pylist()
    view = batch.column("view").to_numpy() if "view" in batch.schema.names else np.zeros(len(keys), np.int16)
    starts = np.flatnonzero([i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))])
    _check_groups(keys, view, starts)
    rows = np.flatnonzero(view == 0) if how == "centre" else np.arange(len(keys))
    k = batch.schema.field("topk_index").type.list_size
    probs = dense_targets(fixed_list_to_numpy(batch.column("topk_index").take(pa.array(rows)), k),
                          fixed_list_to_numpy(batch.column("topk_logit").take(pa.array(rows)), k),
                          batch.column("lse").to_numpy()[rows], temperature, num_classes)
    if how == "mean":
        counts = np.diff(np.append(starts, len(keys)))
        probs = (np.add.reduceat(probs.astype(np.float64), starts, axis=0) / counts[:, None]).astype(np.float32)
    shards = batch.column("shard").to_numpy()[starts]
    return [keys[i] for i in starts], shards, probs


def _check_groups(keys: list[str], view: np.ndarray, starts: np.ndarray) -> None:
    """Every key's rows start with view 0 and its keys are not repeated later (rows grouped by key)."""
    if len(set(keys[i] for i in starts)) != len(starts):
        raise IntegrityError("logits rows of one key are not consecutive; rows must be grouped by key")
    if len(starts) and not np.all(view[starts] == 0):
        bad = keys[int(starts[np.flatnonzero(view[starts] != 0)[0]])]
        raise IntegrityError(f"key {bad!r}: its first row is not view 0 (rows must be views 0..V-1 in order)")

"""``kdpipe export``: a logits or selection artifact as one flat file (CSV, JSON or Parquet), timm-style.

Columns follow timm's ``inference.py``: ``filename`` (here the sample key; ``--filename-col`` renames it),
the classes as ``index`` (ids) or ``label`` (names) per ``--label-type``, and their ``prob`` or ``logit`` per
``--output-type``: a list per row, best first, or with ``--separate-cols`` one column per rank (``index_0``,
``prob_0``, ...); a single class per row (``--topk 1``) gives scalars. Logits: each row's stored top-K
(``prob`` at the stored T, or at ``--temperature`` under ``--residual``, docs/api.md); multi-view artifacts
add a ``view`` column. Selection: one row per selected row with its pseudo-label, ``prob`` = p(label | x)
(the selection's score) or the teacher's ``logit`` of that label, and ``rank``.

CSV cells of lists are JSON arrays; JSON is an array of records (a key can repeat: a multi-label selection,
a view); Parquet keeps list columns. Floats are written as their shortest float32 form. Reading streams
record batches (memory bounded by ``--batch-rows``); the file is written atomically.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.atomic import publish, staged
from pipeline.errors import InputError
from pipeline.options import option
from stages.artifacts.logits_format import RESIDUAL_POLICIES, fixed_list_to_numpy
from stages.artifacts.logits_reader import LogitsSet
from stages.artifacts.selection import TARGET_COLUMNS, SelectionRows
from stages.artifacts.targets import sparse_targets

FORMATS = ("csv", "json", "parquet")


@dataclass(frozen=True)
class ExportOptions:
    """What ``kdpipe export`` writes."""

    format: str | None = option(None, "csv, json or parquet (default: from --output's extension, else csv)",
                                choices=FORMATS)
    label_type: str = option("index", "classes as ids (index) or names (name)", choices=("index", "name"))
    output_type: str = option("prob", "probabilities (prob) or the teacher's raw logits (logit)",
                              choices=("prob", "logit"))
    topk: int | None = option(None, "classes per logits row, best first (default: all stored)", type=int)
    temperature: float | None = option(None, "probabilities at this temperature (default: the stored T)",
                                       type=float)
    residual: str = option("exact", "at another temperature: exact or renorm (docs/api.md)",
                           choices=RESIDUAL_POLICIES)
    separate_cols: bool = option(False, "one column per class rank (index_0, prob_0, ...) instead of lists")
    filename_col: str = option("filename", "name of the sample-key column (timm's default: filename)")
    batch_rows: int = option(65536, "rows read at a time (memory bound)")


def export(manifest: str | Path, output: str | Path, options: ExportOptions = ExportOptions()) -> int:
    """Write the artifact of ``manifest`` (logits or selection) to ``output``; return the rows written."""
    loaded = mf.load(manifest)
    if loaded.kind not in ("logits", "selection"):
        raise InputError(f"{loaded.path}: a {loaded.kind!r} artifact; export takes logits or selection")
    output = Path(output)
    fmt = options.format or (output.suffix.lstrip(".").lower() if output.suffix.lower() in (".json", ".parquet")
                             else "csv")
    frames = _logits_frames(loaded, options) if loaded.kind == "logits" else _selection_frames(loaded, options)
    rows = 0
    with staged(output) as tmp:
        rows = WRITERS[fmt](tmp, frames)
    publish(tmp, output)
    return rows


def _logits_frames(manifest: mf.Manifest, opts: ExportOptions) -> Iterator[pa.Table]:
    logits = LogitsSet(manifest)
    top = logits.topk if opts.topk is None else opts.topk
    if not 1 <= top <= logits.topk:
        raise InputError(f"--topk {opts.topk}: {manifest.path} stores {logits.topk} classes per row")
    for batch in logits.iter_batches(batch_rows=opts.batch_rows):
        index = fixed_list_to_numpy(batch.column("topk_index"), logits.topk)
        logit = fixed_list_to_numpy(batch.column("topk_logit"), logits.topk).astype(np.float32)
        values = logit
        if opts.output_type == "prob":
            lse = batch.column("lse").to_numpy(zero_copy_only=False)
            values = sparse_targets(index, logit, lse, logits.temperature, logits.num_classes, opts.temperature,
                                    opts.residual).probs
        columns = {opts.filename_col: batch.column("key")}
        if "view" in batch.schema.names:
            columns["view"] = batch.column("view")
        columns.update(_classes(index[:, :top], values[:, :top], logits.class_names, opts))
        yield pa.table(columns)


def _selection_frames(manifest: mf.Manifest, opts: ExportOptions) -> Iterator[pa.Table]:
    rows, params = SelectionRows(manifest, opts.batch_rows), manifest.params
    if (opts.output_type == "logit" or opts.temperature is not None) and not rows.has_targets:
        raise InputError(f"{manifest.path}: the selection stores no logits (made without --soft-targets); export "
                         "--output-type prob at its own T, or export its logits artifact")
    columns = ["key", "label", "score", "rank", *(TARGET_COLUMNS if rows.has_targets else ())]
    for path in rows.paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=opts.batch_rows, columns=columns):
            label = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            values = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
            if opts.output_type == "logit" or opts.temperature is not None:
                values = _label_values(batch, label, params, opts)
            out = {opts.filename_col: batch.column("key")}
            out.update(_classes(label[:, None], values.reshape(-1, 1), params["class_names"], opts))
            out["rank"] = batch.column("rank")
            yield pa.table(out)


def _label_values(batch: pa.RecordBatch, label: np.ndarray, params: dict, opts: ExportOptions) -> np.ndarray:
    """The logit (or probability at T') of each row's own label, from the stored top-K."""
    topk = int(params["topk"])
    index = fixed_list_to_numpy(batch.column("topk_index"), topk)
    logit = fixed_list_to_numpy(batch.column("topk_logit"), topk).astype(np.float32)
    where = np.argmax(index == label[:, None], axis=1)[:, None]
    if opts.output_type == "logit":
        return np.take_along_axis(logit, where, axis=1)[:, 0]
    lse = batch.column("lse").to_numpy(zero_copy_only=False)
    probs = sparse_targets(index, logit, lse, float(params["temperature"]), int(params["num_classes"]),
                           opts.temperature, opts.residual).probs
    return np.take_along_axis(probs, where, axis=1)[:, 0]


def _classes(index: np.ndarray, values: np.ndarray, names: list[str], opts: ExportOptions) -> dict[str, pa.Array]:
    """``index``/``label`` and ``prob``/``logit`` columns: lists, per-rank columns, or scalars for one class."""
    name_col, out_col = ("label" if opts.label_type == "name" else "index"), opts.output_type
    classes = pa.array(np.asarray(names, dtype=object)[index].ravel(), pa.string()) if opts.label_type == "name" \
        else pa.array(index.ravel().astype(np.int32))
    scores = pa.array(values.ravel().astype(np.float32))
    width = index.shape[1]
    if width == 1:
        return {name_col: classes, out_col: scores}
    if opts.separate_cols:
        out = {f"{name_col}_{i}": classes.take(pa.array(np.arange(i, len(classes), width))) for i in range(width)}
        out.update({f"{out_col}_{i}": scores.take(pa.array(np.arange(i, len(scores), width))) for i in range(width)})
        return out
    return {name_col: pa.FixedSizeListArray.from_arrays(classes, width).cast(pa.list_(classes.type)),
            out_col: pa.FixedSizeListArray.from_arrays(scores, width).cast(pa.list_(pa.float32()))}


def _plain(value):
    """A cell as JSON-ready Python: float32 values in their shortest form (0.1, not 0.10000000149)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _write_csv(path: Path, frames: Iterator[pa.Table]) -> int:
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for frame in frames:
            if rows == 0:
                writer.writerow(frame.column_names)
            for row in frame.to_pylist():
                writer.writerow([json.dumps(_plain(v)) if isinstance(v, list) else _plain(v) for v in row.values()])
            rows += frame.num_rows
    return rows


def _write_json(path: Path, frames: Iterator[pa.Table]) -> int:
    rows = 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[")
        for frame in frames:
            for row in frame.to_pylist():
                handle.write(("," if rows else "") + "\n" + json.dumps({k: _plain(v) for k, v in row.items()}))
                rows += 1
        handle.write("\n]\n")
    return rows


def _write_parquet(path: Path, frames: Iterator[pa.Table]) -> int:
    rows, writer = 0, None
    try:
        for frame in frames:
            writer = writer or pq.ParquetWriter(path, frame.schema, compression="zstd")
            writer.write_table(frame)
            rows += frame.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise InputError(f"{path}: the artifact has no rows to export")
    return rows


WRITERS = {"csv": _write_csv, "json": _write_json, "parquet": _write_parquet}


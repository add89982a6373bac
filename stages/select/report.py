"""The selection report in ``DIR/report/``: per-class counts against the quota, score quantiles, short
classes, multi-label images (JSON + CSV), two charts (PNG: ``counts.png``, selected and balance copies per
class against the quota; ``scores.png``, the histogram of all selected scores and each class's q10-q90 band
and median), an optional per-class gallery, and a ``report`` manifest (input: the selection) listing every file.

Its cost does not grow with the number of classes beyond numpy work: quantiles for all classes at once, and
charts with one artist per series, never one per class (class names as ticks only up to 40 classes).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest as mf
from stages.artifacts.parquet import source
from stages.artifacts.reports import new_figure, png_bytes, publish_report, report_manifest, step_fill, step_line
from stages.artifacts.selection import REPORT_DIR, report_issues
from stages.select.gallery import gallery_files

log = logging.getLogger(__name__)
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def write_report(selection: mf.Manifest, stats: dict, gallery: int = 0,
                 dataset: str | Path | None = None) -> Path:
    """Write the report beside ``selection`` (before its manifest is published: ``selection`` may exist only in
    memory); return the report manifest's path (kept when it exists and verifies).

    Args:
        selection: the finalized selection manifest.
        stats: the reduce's counts: ``candidates`` per class (images whose top-P held the class, after
            exclusion), ``unique_images``, ``multi_label_images``, ``max_labels_per_image``.
        gallery: images per class in the gallery (the top ones and the last admitted); 0 for none.
        dataset: dataset manifest holding the images (default: selection -> logits -> dataset lineage).
    """
    folder = selection.folder / REPORT_DIR
    target = folder / mf.MANIFEST_NAME
    if not report_issues(selection):
        log.info("%s exists and verifies; delete %s to redo the report", target, folder)
        return target
    files, described = _report(selection, stats, gallery, dataset)
    return publish_report(folder, files, **described, inputs=[mf.input_ref(selection, folder, "selection")])


def report_objects(selection: mf.Manifest, stats: dict, gallery: int = 0,
                   dataset: str | Path | None = None) -> dict[str, bytes]:
    """The report of a selection in object storage, as ``report/NAME`` -> bytes, its manifest included:
    uploaded before the selection's manifest is created (``selection`` is not published yet)."""
    files, described = _report(selection, stats, gallery, dataset)
    data = report_manifest(files, **described, inputs=[mf.input_ref(selection, selection.folder, "selection")])
    files[mf.MANIFEST_NAME] = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    return {f"{REPORT_DIR}/{name}": body for name, body in files.items()}


def _report(selection: mf.Manifest, stats: dict, gallery: int, dataset) -> tuple[dict[str, bytes], dict]:
    table = _read_selection(selection, gallery > 0)
    summary, rows = summarize(table, selection.params, stats)
    files = {"selection_report.json": json.dumps(summary, indent=1, sort_keys=True).encode() + b"\n",
             "per_class.csv": _csv(rows), "counts.png": _counts_png(rows), "scores.png": _scores_png(table, rows)}
    if gallery > 0:
        files.update(gallery_files(selection, table, gallery, dataset))
    return files, {"stage": "select-report", "params": {"of": "selection", "selection_id": selection.id},
                   "totals": {"rows": summary["rows"], "classes": len(summary["per_class"])}}


def _read_selection(selection: mf.Manifest, with_keys: bool) -> pa.Table:
    """The columns the report needs (``key`` and ``shard`` only for the gallery). ``ParquetFile.read``, not
    ``pq.read_table``: the latter imports ``pyarrow.dataset``, which imports pandas (+0.3 s)."""
    columns = (["key", "shard"] if with_keys else []) + ["label", "score", "dup"]
    tables = [pq.ParquetFile(source(selection.file_path(e))).read(columns=columns) for e in selection.files]
    return pa.concat_tables(tables)


def summarize(table: pa.Table, params: dict, stats: dict) -> tuple[dict, list[dict]]:
    """The report's summary dict and one row per class (quota, candidates, selected, copies, quantiles)."""
    names, quotas = params["class_names"], params["per_class"]
    labels, scores, dup = (_numpy(table.column(c)) for c in ("label", "score", "dup"))
    original = dup == 0
    counts = np.bincount(labels[original], minlength=len(names))
    copies = np.bincount(labels[~original], minlength=len(names))
    quant = class_quantiles(labels[original], scores[original], len(names)).tolist()
    rows = [_class_row(c, names[c], quotas[c], stats["candidates"][c], counts[c], copies[c], quant[c])
            for c in range(len(names))]
    short = [r["class"] for r in rows if r["short"]]
    summary = {"rows": table.num_rows, "originals": int(original.sum()), "copies": int((~original).sum()),
               **{k: stats[k] for k in ("unique_images", "multi_label_images", "max_labels_per_image")},
               "quota_total": int(sum(quotas)), "classes_short": short, "num_classes_short": len(short),
               "policy": params["policy"], "top_p": params["top_p"], "min_score": params["min_score"],
               "temperature": params["temperature"], "per_class": rows,
               **({"rank_temperature": params["rank_temperature"]} if "rank_temperature" in params else {})}
    return summary, rows


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as one ndarray, read from its chunks' buffers: in pyarrow 26 ``to_numpy`` (like any
    compute call given a Python or numpy value) imports pandas when it is installed (+0.3 s, +49 MiB)."""
    dtype = np.dtype(column.type.to_pandas_dtype())
    numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    parts = [chunk.to_numpy() if chunk.null_count or not numeric else
             np.frombuffer(chunk.buffers()[1], dtype, len(chunk), chunk.offset * dtype.itemsize)
             for chunk in column.chunks]
    return np.concatenate([np.zeros(0, dtype), *parts])


def class_quantiles(labels: np.ndarray, scores: np.ndarray, classes: int) -> np.ndarray:
    """``QUANTILES`` of each class's scores, shape (classes, len(QUANTILES)), NaN for an empty class: the
    values ``np.quantile(scores[labels == c], QUANTILES)`` gives (method 'linear', same float operations),
    for all classes at once. Rank order (labels ascending, scores descending within a label, as the
    selection stores its originals) is used as is; any other order is sorted first."""
    if not _rank_ordered(labels, scores):
        order = np.lexsort((-scores, labels))
        labels, scores = labels[order], scores[order]
    bounds = np.searchsorted(labels, np.arange(classes + 1))
    sizes = np.diff(bounds)[:, None]
    virtual = (sizes - 1) * np.asarray(QUANTILES)  # ascending position, as np.quantile computes it
    below = np.floor(virtual)
    gamma = virtual - below
    last = bounds[1:, None] - 1  # ascending position i of a class is row last - i
    a = _take(scores, last - below.astype(np.intp))
    b = _take(scores, last - np.minimum(below.astype(np.intp) + 1, sizes - 1))
    out = _lerp(a, b, gamma)
    out[sizes[:, 0] == 0] = np.nan
    return out


def _rank_ordered(labels: np.ndarray, scores: np.ndarray) -> bool:
    """Labels ascending and, within a label, scores descending."""
    same = labels[1:] == labels[:-1]
    return bool(np.all(labels[1:] >= labels[:-1]) and np.all(scores[1:][same] <= scores[:-1][same]))


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]`` with out-of-range indexes (those of empty classes) clipped; zeros when empty."""
    return values.take(index, mode="clip") if len(values) else np.zeros(index.shape, values.dtype)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation, operation for operation (``a + (b - a) t``; from ``b`` when t >= 0.5)."""
    diff = b - a
    out = np.add(a, diff * t)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out


def _class_row(label: int, name: str, quota: int, candidates: int, selected: int, copies: int,
               quant: list[float]) -> dict:
    row = {"label": label, "class": name, "quota": int(quota), "candidates": int(candidates),
           "selected": int(selected), "copies": int(copies), "short": bool(selected < quota)}
    row.update({f"score_q{int(q * 100):02d}": round(v, 6) if selected else None for q, v in zip(QUANTILES, quant)})
    return row


def _csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _counts_png(rows: list[dict]) -> bytes:
    edges = np.arange(len(rows) + 1) - 0.5
    selected, copies, quota = (np.array([r[k] for r in rows]) for k in ("selected", "copies", "quota"))
    fig = new_figure(figsize=(max(6.0, min(16.0, 0.3 * len(rows))), 4))
    ax = fig.add_subplot()
    step_fill(ax, edges, selected, color="tab:blue", label="selected")
    step_fill(ax, edges, selected + copies, selected, color="tab:orange", label="balance copies")
    step_line(ax, edges, quota, color="red", linewidth=1.5, zorder=3, label="quota")
    _class_axis(ax, rows, edges)
    ax.set(ylim=(0, None), ylabel="images", title="selected per class vs quota")
    ax.legend(fontsize=7)
    fig.subplots_adjust(bottom=0.2)
    return png_bytes(fig, dpi=90)


def _scores_png(table: pa.Table, rows: list[dict]) -> bytes:
    """Two panels whatever the number of classes: the histogram of the selected originals' scores, and each
    class's q10-q90 band and median (from ``rows``) across the class index."""
    scores = _numpy(table.column("score"))[_numpy(table.column("dup")) == 0]
    fig = new_figure(figsize=(12, 3.6))
    hist, per_class = fig.subplots(1, 2, width_ratios=(1, 2))
    counts, bins = np.histogram(scores, 40, range=(0.0, 1.0))  # equal bins: no sort of the scores
    step_fill(hist, bins, counts, color="tab:gray")
    hist.set(xlim=(0, 1), ylim=(0, None), xlabel="score", ylabel="images", title="all classes")
    edges = np.arange(len(rows) + 1) - 0.5
    q10, q50, q90 = (np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=float)
                     for k in ("score_q10", "score_q50", "score_q90"))
    step_fill(per_class, edges, q90, q10, color="tab:blue", alpha=0.3, label="q10-q90")
    step_line(per_class, edges, q50, color="tab:blue", linewidth=1, label="median")
    _class_axis(per_class, rows, edges)
    per_class.set(ylim=(0, 1), ylabel="score", title="per class")
    per_class.legend(fontsize=7)
    fig.suptitle("score p(label|x) of selected images")
    fig.subplots_adjust(bottom=0.2, wspace=0.2)
    return png_bytes(fig, dpi=90)


def _class_axis(ax, rows: list[dict], edges: np.ndarray) -> None:
    """The class axis: its range, and the class names as ticks when there are at most 40 classes."""
    ax.set(xlim=(edges[0], edges[-1]), xlabel="class")
    if len(rows) <= 40:
        ax.set_xticks(np.arange(len(rows)), [r["class"] for r in rows], rotation=90, fontsize=7)

"""What is in an artifact, in words (``kdpipe show M``): kind, identity, lineage, parameters, totals, files,
the sidecars beside it, and its first rows (Parquet) or samples (tar shards).

Returns lines of text; printing is the command line's. Reads the manifest and at most ``rows`` rows of the
first part (not re-hashed: ``kdpipe verify M`` checks every byte). Loads neither torch nor webdataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import manifest as mf
from pipeline.options import option
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.parquet import open_parquet
from stages.artifacts.sidecars import sidecars_for
from stages.artifacts.targets import sparse_targets
from stages.shardio import ShardStats, read_shard

WHAT = {"dataset": "WebDataset shards (images, labels, soft targets)",
        "teacher": "a teacher card: weights and preprocessing", "model": "a trained model card",
        "logits": "the teacher's top-K logits per image (Parquet)",
        "selection": "images chosen per class as pseudo-labels (Parquet)",
        "exclusion": "pool images to leave out (Parquet)", "report": "a report (JSON, Markdown, CSV, plots)"}
LIST_SHOWN = 6


@dataclass(frozen=True)
class ShowOptions:
    """What ``kdpipe show`` prints besides the manifest."""

    rows: int = option(5, "first rows (Parquet) or samples (shards) to show; 0 for none")


def describe(path: str | Path, rows: int = ShowOptions.rows) -> list[str]:
    """Lines describing the artifact of manifest ``path`` (file or folder)."""
    manifest = mf.load(path)
    data, producer = manifest.data, manifest.data["producer"]
    made = (f"  made by   {producer['stage']} (kdpipe {producer['kdpipe_version']}) on {producer['host']}, "
            f"{data.get('created_at', '?')}")
    lines = [f"{manifest.kind}: {WHAT.get(manifest.kind, manifest.kind)}", f"  manifest  {manifest.path}",
             f"  id        {manifest.id}", made]
    lines += _lineage(manifest) + _section("params", manifest.params) + _section("totals", manifest.totals)
    lines += _files(manifest)
    first = FIRST.get(manifest.kind)
    if first is not None and rows > 0 and manifest.files:
        lines += first(manifest, rows)
    return lines


def _lineage(manifest: mf.Manifest) -> list[str]:
    if not manifest.inputs:
        return ["lineage: none (a source artifact)"]
    return ["lineage:"] + [f"  {ref.get('role') or '-':<15} {ref['kind']:<10} {ref['id'][:12]}  {ref.get('path', '')}"
                           for ref in manifest.inputs]


def _section(title: str, values: dict) -> list[str]:
    flat = _flatten(values)
    return [f"{title}:"] + [f"  {key} = {_shown(value)}" for key, value in flat] if flat else [f"{title}: none"]


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key in sorted(values):
        value = values[key]
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) > LIST_SHOWN:
        head = ", ".join(json.dumps(v) for v in value[:LIST_SHOWN])
        return f"{len(value)} values: [{head}, ...]"
    return json.dumps(value) if not isinstance(value, str) else value


def _files(manifest: mf.Manifest) -> list[str]:
    files = manifest.files
    size = sum(int(f["bytes"]) for f in files)
    counts = [f"{sum(int(f[k]) for f in files if k in f)} {k}" for k in ("rows", "samples") if any(k in f for f in files)]
    names = [files[0]["path"]] + ([f"... {files[-1]['path']}"] if len(files) > 1 else []) if files else \
        ["none (an ensemble card: its members are its inputs)"]
    lines = [f"files: {len(files)} ({', '.join(counts + [_bytes(size)])}): {' '.join(names)}"]
    beside = [name for name in sidecars_for(manifest.data) if (manifest.folder / name).is_file()]
    if beside:
        lines.append(f"  for other tools: {', '.join(beside)}")
    return lines


def _bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _first_batch(manifest: mf.Manifest, rows: int) -> pa.RecordBatch | None:
    where = manifest.file_path(manifest.files[0])
    if isinstance(where, str):
        return None
    handle = open_parquet(where, hint="; `kdpipe verify` lists every damaged part")
    return next(handle.iter_batches(batch_size=rows), None)


def _first_logits(manifest: mf.Manifest, rows: int) -> list[str]:
    batch = _first_batch(manifest, rows)
    if batch is None or not batch.num_rows:
        return []
    params, topk = manifest.params, int(manifest.params["topk"])
    names, temperature = params["class_names"], float(params["temperature"])
    index = fixed_list_to_numpy(batch.column("topk_index"), topk)
    logit = fixed_list_to_numpy(batch.column("topk_logit"), topk)
    lse = batch.column("lse").to_numpy(zero_copy_only=False)
    sparse = sparse_targets(index, logit, lse, temperature, int(params["num_classes"]))
    lines = [f"first rows of {manifest.files[0]['path']}: key, then class (p at T={temperature:g}) by logit:"]
    for i, key in enumerate(batch.column("key").to_pylist()):
        top = ", ".join(f"{names[c]} ({p:.3f})" for c, p in zip(index[i], sparse.probs[i]))
        lines.append(f"  {key}  {top}; other classes {sparse.residual[i]:.3f}")
    return lines


def _first_table(columns: tuple[str, ...]):
    def first(manifest: mf.Manifest, rows: int) -> list[str]:
        batch = _first_batch(manifest, rows)
        if batch is None or not batch.num_rows:
            return []
        names = manifest.params.get("class_names")
        shown = [c for c in columns if c in batch.schema.names]
        lines = [f"first rows of {manifest.files[0]['path']}: {', '.join(shown)}"]
        for row in batch.select(shown).to_pylist():
            if names is not None and "label" in row and names[row["label"]] != str(row["label"]):
                row["label"] = f"{row['label']} ({names[row['label']]})"
            lines.append("  " + "  ".join(_cell(row[c]) for c in shown))
        return lines
    return first


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _first_samples(manifest: mf.Manifest, rows: int) -> list[str]:
    where = manifest.file_path(manifest.files[0])
    if isinstance(where, str):
        return [f"first samples: {where} is remote (not read)"]
    lines = [f"first samples of {manifest.files[0]['path']}: key, members, cls, json"]
    for count, (key, fields) in enumerate(read_shard(where, ShardStats(str(where)))):
        if count >= rows:
            break
        cls = fields["cls"].decode("ascii", "replace").strip() if "cls" in fields else "-"
        lines.append(f"  {key}  {','.join(sorted(fields))}  cls={cls}  {_json_summary(fields.get('json'))}")
    return lines


def _json_summary(body: bytes | None) -> str:
    if body is None:
        return ""
    try:
        record = json.loads(body)
    except ValueError:
        return "(json unreadable)"
    if not isinstance(record, dict):
        return ""
    short = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
    return " ".join(f"{k}={_cell(v)}" for k, v in sorted(short.items()))


FIRST = {"logits": _first_logits, "selection": _first_table(("key", "label", "score", "rank", "dup")),
         "exclusion": _first_table(("key", "reason", "matched_key", "similarity")), "dataset": _first_samples}


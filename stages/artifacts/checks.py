"""Content checks that ``kdpipe verify`` runs per file, by manifest kind (``CHECKS``).

``pipeline.verify`` re-hashes files and compares counts; these checks look inside a file whose bytes match
its manifest, so they catch a part that was *written* wrong (a buggy or foreign producer), not only one
damaged later. Logits parts: readable footer, columns and types of the contract, metadata agreeing with the
manifest, the part's shard index, unique keys (unique (key, view) pairs in a multi-view part), class ids in
[0, C) and distinct per row, top-K logits sorted descending, finite lse with lse >= max(z)/T (and, when the
part stores it, finite lse1 >= max(z)), and softened probabilities summing to at most 1. Reading streams record
batches (memory bounded by the batch, plus the part's keys for the duplicate check). With the last file of a
manifest, the check of every kind also compares the sidecars beside it (``README.md`` dataset card, timm's
``_info.json``) with what the manifest gives; a selection made by ``kdpipe select`` also needs its report
(``report/``: a report manifest of this selection whose files verify), which the stage promises.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import IntegrityError
from pipeline.verify import ContentCheck
from stages.artifacts.dataset_check import check_dataset_part
from stages.artifacts.exclusion import check_exclusion_part
from stages.artifacts.logits_format import LSE1, READ_VERSIONS, fixed_list_to_numpy, index_type, read_metadata
from stages.artifacts.logits_reader import AGREEING, row_faults
from stages.artifacts.parquet import open_parquet
from stages.artifacts.selection import check_selection_part, report_problems
from stages.artifacts.sidecars import sidecar_problems

_BATCH_ROWS = 65536
_MAX_PROBLEMS = 5


def check_logits_part(manifest: mf.Manifest, entry: dict, where: Path) -> list[str]:
    """Every problem found inside one logits part (empty when it is sound)."""
    try:
        handle = open_parquet(where)
    except IntegrityError as exc:
        return [str(exc)]
    params = manifest.params
    problems = _schema_problems(where, handle, params) + _meta_problems(where, handle, params)
    if problems:
        return problems
    match = re.fullmatch(r"part-(\d+)\.parquet", Path(entry["path"]).name)
    if match is None:
        return [f"{where}: not named part-NNNNNN.parquet (part i holds dataset shard i)"]
    shard = int(match.group(1))
    try:
        problems = _row_problems(where, handle, params, shard)
    except Exception as exc:  # damaged pages raise from the reader
        problems = [f"{where}: unreadable rows ({type(exc).__name__}: {exc})"]
    return problems


def _schema_problems(where: Path, handle: pq.ParquetFile, params: dict) -> list[str]:
    schema, topk = handle.schema_arrow, int(params["topk"])
    wanted = {"key", "shard", "topk_index", "topk_logit", "lse"}
    missing = wanted - set(schema.names)
    if missing:
        return [f"{where}: missing column(s) {sorted(missing)}"]
    problems = []
    for name in ("topk_index", "topk_logit"):
        kind = schema.field(name).type
        if getattr(kind, "list_size", None) != topk:
            problems.append(f"{where}: column {name} is {kind}, expected a fixed-size list of {topk}")
    if schema.field("topk_index").type.value_type not in (index_type(int(params["num_classes"])),):
        problems.append(f"{where}: topk_index values are {schema.field('topk_index').type.value_type}")
    return problems


def _meta_problems(where: Path, handle: pq.ParquetFile, params: dict) -> list[str]:
    meta = read_metadata(handle.schema_arrow)
    if meta.get("schema_version") not in READ_VERSIONS:
        return [f"{where}: metadata schema_version {meta.get('schema_version')!r}, expected one of {READ_VERSIONS}"]
    return [f"{where}: metadata {k}={meta.get(k)!r}, the manifest says {params.get(k)!r}"
            for k in AGREEING if meta.get(k) != params.get(k)]


def _row_problems(where: Path, handle: pq.ParquetFile, params: dict, shard: int) -> list[str]:
    seen: set[str] = set()
    problems: list[str] = []
    offset = 0
    for batch in handle.iter_batches(batch_size=_BATCH_ROWS):
        problems += _batch_problems(batch, params, shard, seen, offset)
        offset += batch.num_rows
        if len(problems) >= _MAX_PROBLEMS:
            break
    return [f"{where}: {p}" for p in problems[:_MAX_PROBLEMS]]


def _batch_problems(batch, params: dict, shard: int, seen: set[str], offset: int) -> list[str]:
    topk, classes, temperature = int(params["topk"]), int(params["num_classes"]), float(params["temperature"])
    keys = batch.column("key").to_pylist()
    index = fixed_list_to_numpy(batch.column("topk_index"), topk).astype(np.int64)
    logit = fixed_list_to_numpy(batch.column("topk_logit"), topk).astype(np.float64)
    lse = batch.column("lse").to_numpy(zero_copy_only=False).astype(np.float64)
    shards = batch.column("shard").to_numpy(zero_copy_only=False)
    problems = _key_problems(_row_ids(batch, keys), seen)
    top = logit[:, 0] / temperature
    slack = 1e-3 * (1.0 + np.abs(top))  # float16 storage rounds z by up to ~5e-4 relative
    rows = lambda mask: ", ".join(f"{offset + int(i)} ({keys[int(i)]})" for i in np.flatnonzero(mask)[:3])
    outside, unsorted = row_faults(index, logit, classes)  # the reader's own row checks
    checks = [
        (shards != shard, f"shard column differs from the part's shard index {shard}"),
        outside,
        ((np.diff(np.sort(index, axis=1), axis=1) == 0).any(axis=1), "a class id repeated within a row"),
        unsorted,
        (~np.isfinite(lse) | (lse < top - slack), "lse not finite or below max(z)/T"),
        (np.exp(logit / temperature - lse[:, None]).sum(axis=1) > np.exp(slack) * (1.0 + 1e-3),
         "softened top-K sums above 1"),
    ]
    if LSE1 in batch.schema.names:  # schema version 2: the T = 1 normaliser is at least max(z)
        lse1 = batch.column(LSE1).to_numpy(zero_copy_only=False).astype(np.float64)
        slack1 = 1e-3 * (1.0 + np.abs(logit[:, 0]))
        checks.append((~np.isfinite(lse1) | (lse1 < logit[:, 0] - slack1), "lse1 not finite or below max(z)"))
    problems += [f"rows {rows(mask)}: {what}" for mask, what in checks if mask.any()]
    return problems


def _row_ids(batch, keys: list) -> list:
    """What must be unique in a part: the key, or (key, view) in a multi-view part (docs/views.md)."""
    if "view" not in batch.schema.names:
        return keys
    views = batch.column("view").to_pylist()
    return [None if k is None else f"{k} (view {v})" if v else k for k, v in zip(keys, views)]


def _key_problems(keys: list, seen: set[str]) -> list[str]:
    problems = []
    for key in keys:
        if key is None or key in seen:
            problems.append(f"key {key!r} appears twice (or is null)")
        else:
            seen.add(key)
    return problems[:3]


def plus_sidecars(check: ContentCheck | None, *once: Callable[[mf.Manifest], list[str]]) -> ContentCheck:
    """``check`` per file, plus ``sidecar_problems`` and each of ``once`` once per artifact (with its last file)."""
    def run(manifest: mf.Manifest, entry: dict, where: Path) -> list[str]:
        problems = check(manifest, entry, where) if check is not None else []
        files = manifest.data.get("files")
        if files and entry is files[-1]:
            problems += sidecar_problems(manifest)
            for artifact_check in once:
                problems += artifact_check(manifest)
        return problems
    return run


_PER_FILE = {"dataset": check_dataset_part, "logits": check_logits_part,
             "selection": check_selection_part, "exclusion": check_exclusion_part}
_ONCE = {"selection": (report_problems,)}  # what a stage promises beside its manifest (select: its report)
CHECKS = {kind: plus_sidecars(check, *_ONCE.get(kind, ())) for kind, check in _PER_FILE.items()}

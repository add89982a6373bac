"""Dedup: contamination and near-duplicate filter on teacher embeddings (faiss), as an exclusion artifact.

Embeddings are the logits artifacts' optional ``embedding`` column (L2-normalised float16; renormalised
in float32 here), so cosine similarity is the inner product. Two findings, one row per excluded key:

- ``contaminated``: a query image within ``threshold`` of any reference image (e.g. the evaluation set);
  ``matched_key`` is its most similar reference image.
- ``near_duplicate``: query images linked by similarity >= ``threshold`` (each to its ``neighbors``
  nearest query images) form groups (connected components); per group the smallest key that is not
  contaminated is kept and the others are excluded, ``matched_key`` being the kept key and
  ``similarity`` their cosine to it (in a chain it can be below the threshold).

Scaling (``method="flat"``, the default and the reference): exact flat inner-product indexes (GPU when
``faiss.get_num_gpus() > 0``). Queries are searched in batches of ``batch_rows``, so search buffers are bounded by
the batch; the indexes hold the reference (N_ref x D float32) and, for the near-duplicate search, the query set
(N_query x D float32); search time grows as N_query x (N_ref + N_query) x D. ``method="ivf"`` is the sharded
path for pools far beyond one process (``stages.dedup.ivf``: array-task steps, memory bounded by a block, the
same artifact); docs/dedup.md compares the two.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.progress import advance
from pipeline.tasks import file_entries, finalize, run_parts
from pipeline.verify import parquet_rows
from stages.artifacts.exclusion import REASONS
from stages.artifacts.logits_reader import LogitsSet, open_logits
from stages.artifacts.parquet import write_parquet
from stages.artifacts.sidecars import with_sidecars
from stages.dedup.core import check_embeddings, components, flat_index, group_keep, keep_per_component, load_embeddings  # noqa: F401  (components, keep_per_component: re-exported)
from stages.dedup.ivf import dedup_ivf
from stages.dedup.options import DedupOptions

log = logging.getLogger(__name__)
CODE_VERSION = "dedup-1"


def dedup(query: str | Path, out: str | Path, *, reference: str | Path | None = DedupOptions.reference,
          threshold: float = DedupOptions.threshold, neighbors: int = DedupOptions.neighbors,
          batch_rows: int = DedupOptions.batch_rows, method: str = DedupOptions.method, **ivf_options) -> Path | None:
    """Write the exclusion artifact of ``query`` (contaminated by ``reference``, near-duplicates inside).

    Args:
        query: logits manifest of the pool to filter (must carry embeddings).
        out: output folder (``part-000000.parquet`` + ``manifest.json``, kind ``exclusion``).
        reference: logits manifest of the images that must not leak into the pool (same teacher).
        threshold: cosine similarity at or above which two images are the same.
        neighbors: nearest query images examined per query image for near-duplicate links.
        batch_rows: query rows per search batch.
        method: ``flat`` (exact, one process) or ``ivf`` (sharded steps, ``stages.dedup.ivf.dedup_ivf``).
        ivf_options: the ``ivf`` method's settings and task flags (see ``dedup_ivf``).

    Returns:
        The exclusion manifest's path (None when an ``ivf`` step other than ``group`` ran).
    """
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"--threshold {threshold}: must be a cosine similarity in (0, 1]")
    if method == "ivf":
        return dedup_ivf(query, out, reference=reference, threshold=threshold, neighbors=neighbors,
                         batch_rows=batch_rows, **ivf_options)
    pool = open_logits(query)
    ref = open_logits(reference) if reference else None
    check_embeddings(pool, ref)
    params = {"threshold": threshold, "neighbors": neighbors, "metric": "cosine", "index": "flat",
              "query_id": pool.id, "reference_id": ref.id if ref else None, "teacher_id": pool.teacher_id}
    store = PartStore(Path(out), ".parquet", fingerprint("dedup", params, CODE_VERSION), parquet_rows)
    write = lambda tmp: _write(tmp, pool, ref, threshold, neighbors, batch_rows)
    report = run_parts(store, [0], lambda index: store.commit(index, write), desc="dedup")
    if report.exit_code:
        raise InputError(f"{out}: dedup failed: {report.failed or report.given_up}; the log above "
                         "names the cause")
    inputs = [mf.input_ref(pool.manifest, Path(out), "query")]
    if ref:
        inputs.append(mf.input_ref(ref.manifest, Path(out), "reference"))
    build = lambda receipts: mf.build(
        "exclusion", stage="dedup", params=params, files=file_entries(receipts), inputs=inputs,
        totals={"rows": receipts[0]["rows"], "samples": int(pool.manifest.totals.get("rows", 0)),
                **receipts[0]["extra"]})
    return finalize(store, 1, with_sidecars(Path(out), build))


def _write(tmp: Path, pool: LogitsSet, ref: LogitsSet | None, threshold: float, neighbors: int,
           batch_rows: int) -> PartResult:
    keys, matrix = load_embeddings(pool, batch_rows)
    contaminated = contamination(matrix, ref, threshold, batch_rows) if ref else _none(len(keys))
    rows, cols, _ = near_pairs(matrix, threshold, neighbors, batch_rows)
    kept_of = group_keep(len(keys), rows, cols, keys, contaminated[0] >= 0)
    table = _exclusion_table(keys, matrix, contaminated, kept_of)
    write_parquet(table, tmp)
    reasons = table.column("reason").to_pylist()
    extra = {reason: reasons.count(reason) for reason in REASONS}
    log.info("dedup: %d query images, %d contaminated, %d near-duplicates", len(keys), extra["contaminated"],
             extra["near_duplicate"])
    return PartResult(expected_rows=table.num_rows, extra=extra, samples=len(keys))


def _none(n: int) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    return np.full(n, -1, np.int64), np.zeros(n, np.float32), pa.array([], pa.string())


def contamination(matrix: np.ndarray, ref: LogitsSet, threshold: float,
                  batch_rows: int) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Per query row: the nearest reference row if within ``threshold`` (else -1) and its similarity;
    and the reference keys."""
    ref_keys, ref_matrix = load_embeddings(ref, batch_rows)
    index = flat_index(ref_matrix)
    match, sims, _ = _none(len(matrix))
    for start in range(0, len(matrix), batch_rows):
        sim, idx = index.search(matrix[start:start + batch_rows], 1)
        hit = (sim[:, 0] >= threshold) & (idx[:, 0] >= 0)
        match[start:start + len(hit)][hit] = idx[hit, 0]
        sims[start:start + len(hit)][hit] = sim[hit, 0]
    return match, sims, ref_keys


def near_pairs(matrix: np.ndarray, threshold: float, neighbors: int,
               batch_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j, of query rows with cosine >= ``threshold`` among each row's nearest ``neighbors``."""
    if len(matrix) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = flat_index(matrix)
    k = min(neighbors + 1, len(matrix))
    found = []
    for start in range(0, len(matrix), batch_rows):
        sim, idx = index.search(matrix[start:start + batch_rows], k)
        advance(len(sim))  # query images searched: the task's live progress
        own = np.arange(start, start + len(sim))[:, None]
        hit = (sim >= threshold) & (idx != own) & (idx >= 0)
        r, c = np.nonzero(hit)
        found.append((own[r, 0], idx[r, c], sim[r, c]))
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _exclusion_table(keys: pa.Array, matrix: np.ndarray, contaminated: tuple, kept_of: np.ndarray) -> pa.Table:
    match, match_sim, ref_keys = contaminated
    dirty = np.flatnonzero(match >= 0)
    dupes = np.flatnonzero((kept_of >= 0) & (kept_of != np.arange(len(kept_of))) & (match < 0))
    dup_sim = np.einsum("ij,ij->i", matrix[dupes], matrix[kept_of[dupes]]).astype(np.float32)
    table = pa.table({
        "key": pa.concat_arrays([keys.take(pa.array(dirty)), keys.take(pa.array(dupes))]),
        "reason": pa.array(["contaminated"] * len(dirty) + ["near_duplicate"] * len(dupes), pa.string()),
        "matched_key": pa.concat_arrays([ref_keys.take(pa.array(match[dirty])),
                                         keys.take(pa.array(kept_of[dupes]))]),
        "similarity": pa.array(np.concatenate([match_sim[dirty], dup_sim]).astype(np.float32), pa.float32()),
    })
    return table.sort_by([("key", "ascending")])

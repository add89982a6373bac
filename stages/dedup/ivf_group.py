"""The IVF dedup's group step: union-find over the search parts' pairs -> the exclusion table (flat's format).

Pairs are streamed part by part (an edge buffer holds one search part's pairs); the union-find state, the keys and
the contamination flags are per row that appears in a pair (or is contaminated), never per pool image. Per group
the kept row is the smallest key that is not contaminated (``stages.dedup.core.keep_per_component``); a
near-duplicate's ``similarity`` is its cosine to the kept row, as in the flat method.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest as mf
from pipeline.parts import PartResult
from stages.artifacts.parquet import read_parquet, write_parquet
from stages.dedup.core import keep_per_component, unit
from stages.dedup.ivf_compute import from_binary

log = logging.getLogger(__name__)


def _parts(manifest: mf.Manifest, columns: list[str], what: str):
    for entry in manifest.files:
        yield read_parquet(manifest.file_path(entry), columns, what)


def nodes_of(searched: mf.Manifest) -> tuple[np.ndarray, pa.Array]:
    """Every row id in a pair, sorted, and its key."""
    gids, keys = [], []
    for table in _parts(searched, ["a", "b", "key_a", "key_b"], "dedup search part"):
        ids = np.concatenate([table.column("a").to_numpy(), table.column("b").to_numpy()])
        names = pa.concat_arrays([table.column("key_a").combine_chunks(), table.column("key_b").combine_chunks()])
        ids, first = np.unique(ids, return_index=True)
        gids.append(ids)
        keys.append(names.take(pa.array(first)))
    if not gids:
        return np.zeros(0, np.int64), pa.array([], pa.string())
    ids, first = np.unique(np.concatenate(gids), return_index=True)
    return ids, pa.concat_arrays(keys).take(pa.array(first))


def find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of ``x`` (compressing their paths)."""
    root = parent[x]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    parent[x] = root
    return root


def union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the sets of each edge (u, v); a root always points to a smaller index (the root is the minimum)."""
    while len(u):
        ru, rv = find(parent, u), find(parent, v)
        apart = ru != rv
        u, v = np.minimum(ru, rv)[apart], np.maximum(ru, rv)[apart]
        np.minimum.at(parent, v, u)


def roots(parent: np.ndarray) -> np.ndarray:
    """Each node's root (its component's smallest index)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def contaminated_of(assigned: mf.Manifest) -> pa.Table:
    """Primary rows of the assign parts that matched a reference image: gid, key, ref_key, ref_sim."""
    tables = []
    for entry in assigned.files:
        path = assigned.file_path(entry)
        flags = read_parquet(path, ["ref_key"], "dedup assign part").column("ref_key")
        if flags.null_count < len(flags):
            table = read_parquet(path, ["gid", "key", "ref_key", "ref_sim"], "dedup assign part")
            tables.append(table.filter(pc.is_valid(table.column("ref_key"))))
    schema = pa.schema([("gid", pa.int64()), ("key", pa.string()), ("ref_key", pa.string()),
                        ("ref_sim", pa.float32())])
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def vectors_of(searched: mf.Manifest, wanted: np.ndarray) -> np.ndarray:
    """Unit float32 embeddings of the sorted row ids ``wanted`` (from the pairs that carry them)."""
    found = None
    for table in _parts(searched, ["a", "b", "emb_a", "emb_b"], "dedup search part"):
        for side in ("a", "b"):
            ids, values = table.column(side).to_numpy(), from_binary(table.column(f"emb_{side}"))
            if found is None:
                found = np.zeros((len(wanted), values.shape[1]), np.float16)
            pos = np.minimum(np.searchsorted(wanted, ids), max(len(wanted) - 1, 0))
            hit = (wanted[pos] == ids) if len(wanted) else np.zeros(len(ids), bool)
            found[pos[hit]] = values[hit]
    return unit(found) if found is not None else np.zeros((0, 1), np.float32)


def group_part(searched: mf.Manifest, assigned: mf.Manifest, settings, tmp: Path) -> PartResult:
    """The exclusion part: contaminated rows, then near-duplicates of each group's kept row, sorted by key."""
    gids, keys = nodes_of(searched)
    parent = np.arange(len(gids))
    for table in _parts(searched, ["a", "b"], "dedup search part"):
        union(parent, np.searchsorted(gids, table.column("a").to_numpy()),
              np.searchsorted(gids, table.column("b").to_numpy()))
    dirty = contaminated_of(assigned)
    is_dirty = np.isin(gids, dirty.column("gid").to_numpy())
    kept_of = keep_per_component(roots(parent), keys, is_dirty) if len(gids) else np.zeros(0, np.int64)
    dupes = np.flatnonzero((kept_of >= 0) & (kept_of != np.arange(len(gids))) & ~is_dirty)
    wanted = np.unique(np.concatenate([dupes, kept_of[dupes]]))
    vectors = vectors_of(searched, gids[wanted])
    at = lambda rows: np.searchsorted(wanted, rows)
    dup_sim = np.einsum("ij,ij->i", vectors[at(dupes)], vectors[at(kept_of[dupes])]).astype(np.float32)
    table = pa.table({
        "key": pa.concat_arrays([dirty.column("key").combine_chunks(), keys.take(pa.array(dupes))]),
        "reason": pa.array(["contaminated"] * dirty.num_rows + ["near_duplicate"] * len(dupes), pa.string()),
        "matched_key": pa.concat_arrays([dirty.column("ref_key").combine_chunks(),
                                         keys.take(pa.array(kept_of[dupes]))]),
        "similarity": pa.array(np.concatenate([dirty.column("ref_sim").to_numpy(), dup_sim]).astype(np.float32),
                               pa.float32()),
    }).sort_by([("key", "ascending")])
    write_parquet(table, tmp)
    extra = {"contaminated": dirty.num_rows, "near_duplicate": len(dupes)}
    log.info("dedup group: %d rows in pairs, %d contaminated, %d near-duplicates", len(gids), *extra.values())
    return PartResult(expected_rows=table.num_rows, extra=extra)

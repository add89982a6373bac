"""What both dedup methods share: unit-norm float32 embeddings, exact faiss indexes, groups and their kept row.

- ``unit_rows``: float16 embeddings -> float32 renormalised (cosine = inner product), the one conversion.
- ``flat_index``: an exact inner-product index, on the GPU(s) when faiss sees one.
- ``components`` / ``group_keep`` / ``keep_per_component``: connected components of the near-duplicate graph
  and, per group, the row kept (the smallest key that is not contaminated).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import LogitsSet

log = logging.getLogger(__name__)


def unit_rows(column, dim: int) -> np.ndarray:
    """An ``embedding`` column (fixed_size_list<float16>[D]) as contiguous unit-norm float32 rows."""
    return unit(fixed_list_to_numpy(column, dim))


def unit(values: np.ndarray) -> np.ndarray:
    """Rows of ``values`` (any float dtype) as contiguous unit-norm float32 rows (zero rows stay zero)."""
    matrix = values.astype(np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix /= np.where(norms > 0, norms, 1.0)
    return np.ascontiguousarray(matrix)


def check_embeddings(pool: LogitsSet, ref: LogitsSet | None) -> None:
    """Refuse logits without embeddings, or a reference whose embeddings are another teacher's."""
    for item in [pool] + ([ref] if ref else []):
        if not item.params.get("embedding_dim"):
            raise InputError(f"{item.manifest.path}: has no embedding column; rerun `kdpipe logits` with "
                             "embeddings to dedup it")
    if ref and (ref.teacher_id, ref.params["embedding_dim"]) != (pool.teacher_id, pool.params["embedding_dim"]):
        raise InputError(f"{ref.manifest.path}: embeddings of teacher {ref.teacher_id[:12]} (dim "
                         f"{ref.params['embedding_dim']}) cannot be compared with {pool.manifest.path}'s "
                         f"(teacher {pool.teacher_id[:12]}, dim {pool.params['embedding_dim']})")


def load_embeddings(logits: LogitsSet, batch_rows: int) -> tuple[pa.Array, np.ndarray]:
    """All keys and unit-norm float32 embeddings of ``logits`` (memory: N x D x 4 bytes)."""
    dim = int(logits.params["embedding_dim"])
    keys, vectors = [], []
    for batch in logits.iter_batches(columns=["key", "embedding"], batch_rows=batch_rows):
        keys.append(batch.column("key"))
        vectors.append(fixed_list_to_numpy(batch.column("embedding"), dim).astype(np.float32))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix /= np.where(norms > 0, norms, 1.0)
    return pa.chunked_array(keys, pa.string()).combine_chunks(), np.ascontiguousarray(matrix)


def flat_index(matrix: np.ndarray):
    """An exact inner-product faiss index over ``matrix``, on the GPU(s) when faiss sees one."""
    index = faiss.IndexFlatIP(matrix.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
        log.info("dedup: faiss index on %d GPU(s)", faiss.get_num_gpus())
    index.add(matrix)
    return index


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected components of the undirected graph on n nodes with edges (rows, cols): the smallest node
    index of each node's component (min-label propagation with pointer jumping)."""
    label = np.arange(n)
    while True:
        before = label.copy()
        low = np.minimum(label[rows], label[cols])
        np.minimum.at(label, rows, low)
        np.minimum.at(label, cols, low)
        label = label[label]
        if np.array_equal(label, before):
            return label


def group_keep(n: int, rows: np.ndarray, cols: np.ndarray, keys: pa.Array,
               contaminated: np.ndarray) -> np.ndarray:
    """For each query row in a near-duplicate group: the row kept for its group (-1 when not grouped).

    The kept row is the group's smallest key that is not contaminated (-1 for a group of only
    contaminated rows).
    """
    if len(rows) == 0:
        return np.full(n, -1, np.int64)
    return keep_per_component(components(n, rows, cols), keys, contaminated)


def keep_per_component(component: np.ndarray, keys: pa.Array, contaminated: np.ndarray) -> np.ndarray:
    """``group_keep`` given each row's component label (a row index of its component)."""
    n = len(component)
    kept_of = np.full(n, -1, np.int64)
    members = np.flatnonzero(np.bincount(component, minlength=n)[component] > 1)
    order = pc.sort_indices(pa.table({"c": component[members], "x": contaminated[members],
                                      "k": keys.take(pa.array(members))}),
                            sort_keys=[("c", "ascending"), ("x", "ascending"), ("k", "ascending")]).to_numpy()
    members = members[order]
    first = np.r_[True, component[members][1:] != component[members][:-1]]
    head = members[np.maximum.accumulate(np.where(first, np.arange(len(members)), 0))]
    kept_of[members] = np.where(contaminated[head], -1, head)
    return kept_of



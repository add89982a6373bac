"""The computing of the IVF dedup steps, one part at a time: train the quantizer, assign a part, search lists.

Layouts (Parquet parts, one folder per step, see ``stages.dedup.ivf``):

- train part: ``list`` int32, ``centroid`` fixed_size_list<float32>[D] (unit norm), one row per list.
- assign part: ``list`` int32, ``gid`` int64 (``(logits part << 32) + row``), ``primary`` bool, ``key``,
  ``embedding`` (the logits part's float16 values, unchanged, as fixed_size_binary[2 D]), ``ref_key`` / ``ref_sim`` (the most similar
  reference image when at or above the threshold, on primary rows; else null); sorted by (list, gid), one row
  group per search part (``list_block`` lists) with ``list`` statistics, so a search part reads one contiguous
  row group of each assign part and nothing else.
- search part: one row per pair ``a < b`` (row ids) at cosine >= threshold: ``a``, ``b``, ``sim``, ``key_a``,
  ``key_b``, ``emb_a``, ``emb_b``; sorted by (a, b).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.parts import PartResult
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import LogitsSet
from stages.artifacts.parquet import open_parquet, read_parquet
from stages.dedup import ivf_pq
from stages.dedup.core import flat_index, load_embeddings, unit, unit_rows

log = logging.getLogger(__name__)
NITER = 20
HNSW_M = 32
_GPU: list = []  # one faiss GPU resource per process, made on first use


@dataclass(frozen=True)
class Settings:
    """The IVF method's settings (see ``DedupOptions``)."""

    threshold: float
    neighbors: int
    batch_rows: int
    lists: int
    probe: int
    train_sample: int
    seed: int
    list_block: int
    assign_block: int = 1
    quantizer: str = "flat"
    pq: int = 0
    pq_margin: float = 0.1

    def check(self) -> None:
        for name in ("neighbors", "batch_rows", "lists", "probe", "train_sample", "list_block", "assign_block"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.probe > self.lists:
            raise InputError(f"--probe {self.probe}: at most --lists ({self.lists})")
        if self.train_sample < self.lists:
            raise InputError(f"--train-sample {self.train_sample}: at least --lists ({self.lists}); faiss advises "
                             "39 or more per list")
        if self.pq < 0 or not 0 <= self.pq_margin < 1:
            raise InputError(f"--pq {self.pq} --pq-margin {self.pq_margin}: --pq must be >= 0 (0: off) and "
                             "--pq-margin in [0, 1)")

    def train_params(self) -> dict:
        return {"lists": self.lists, "train_sample": self.train_sample, "seed": self.seed, "niter": NITER,
                "kmeans": "spherical", **({"pq": self.pq, "pq_bits": ivf_pq.BITS} if self.pq else {})}

    def search_params(self) -> dict:
        return {"threshold": self.threshold, "neighbors": self.neighbors, "list_block": self.list_block,
                **({"pq_margin": self.pq_margin} if self.pq else {})}

    def search_parts(self) -> int:
        return -(-self.lists // self.list_block)


def _fixed(values: np.ndarray, kind: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), kind), values.shape[1])


def to_binary(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """float16 rows as fixed_size_binary[2 D] (internal step files: ~4x faster to write than a list column)."""
    values = np.ascontiguousarray(values, np.float16)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * values.shape[1]), len(values),
                                                [None, pa.py_buffer(values.tobytes())])


def from_binary(column) -> np.ndarray:
    """The float16 rows of a fixed_size_binary[2 D] column (``to_binary``'s inverse)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.byte_width
    raw = np.frombuffer(array.buffers()[1], np.uint8)[array.offset * width:(array.offset + len(array)) * width]
    return raw.view(np.float16).reshape(len(array), width // 2)


def _codecs(table: pa.Table) -> dict:
    """Embeddings uncompressed (random float16 does not compress: 2-4x faster writes), the rest zstd."""
    return {name: "none" if name.startswith("emb") else "zstd" for name in table.column_names}


def write_step(table: pa.Table, tmp: Path) -> None:
    """Write a step part (one row group)."""
    pq.write_table(table, tmp, compression=_codecs(table), use_dictionary=False, row_group_size=max(1, len(table)))


def write_by_block(rows: pa.Table, tmp: Path, list_block: int) -> None:
    """Write rows sorted by list as one row group per block of ``list_block`` lists (empty blocks: none)."""
    block = rows.column("list").to_numpy() // list_block
    cuts = np.flatnonzero(np.r_[True, block[1:] != block[:-1], True]) if len(block) else np.zeros(1, np.int64)
    with pq.ParquetWriter(tmp, rows.schema, compression=_codecs(rows), use_dictionary=False,
                          write_statistics=["list"]) as writer:
        for start, stop in zip(cuts[:-1], cuts[1:]):
            writer.write_table(rows.slice(start, stop - start), row_group_size=stop - start)
        if not len(block):
            writer.write_table(rows)


# --- train -------------------------------------------------------------------------------------------------------

def sample_parts(pool: LogitsSet, want: int, seed: int) -> list[int]:
    """Logits parts, in a seeded random order, until they hold ``want`` rows (sorted)."""
    order = np.random.default_rng(seed).permutation(pool.num_parts)
    rows = np.cumsum([pool.manifest.files[i]["rows"] for i in order])
    stop = int(np.searchsorted(rows, want)) + 1
    return sorted(int(i) for i in order[:stop])


def train_part(pool: LogitsSet, settings: Settings, tmp: Path) -> PartResult:
    """Spherical k-means of ``lists`` centroids on a seeded sample of the pool's embeddings."""
    dim = int(pool.params["embedding_dim"])
    parts = sample_parts(pool, settings.train_sample, settings.seed)
    vectors = np.concatenate([unit_rows(pool.read_part(i, ["embedding"]).column("embedding"), dim) for i in parts])
    if len(vectors) < settings.lists:
        raise InputError(f"--lists {settings.lists}: the pool has only {len(vectors)} images; lower --lists")
    rng = np.random.default_rng(settings.seed)
    sample = vectors[np.sort(rng.choice(len(vectors), min(settings.train_sample, len(vectors)), replace=False))]
    kmeans = faiss.Kmeans(dim, settings.lists, niter=NITER, seed=settings.seed, spherical=True,
                          gpu=faiss.get_num_gpus() > 0, verbose=False)
    kmeans.train(sample)
    table = pa.table({"list": pa.array(np.arange(settings.lists, dtype=np.int32)),
                      "centroid": _fixed(kmeans.centroids.astype(np.float32), pa.float32())})
    if settings.pq:  # the product quantizer's centroids as bytes, on the first row
        blob = ivf_pq.train_pq(sample, settings.pq, settings.seed)
        table = table.append_column("pq", pa.array([blob] + [None] * (settings.lists - 1), pa.large_binary()))
    pq.write_table(table, tmp, compression="zstd")
    log.info("dedup train: %d centroids from %d embeddings of %d parts", settings.lists, len(sample), len(parts))
    return PartResult(expected_rows=settings.lists, extra={"sample_rows": len(sample), "sample_parts": len(parts)})


# --- assign ------------------------------------------------------------------------------------------------------

def assign_state(trained: mf.Manifest, ref: LogitsSet | None, settings: Settings) -> dict:
    """What an assign task loads once: the centroid index and the reference's index and keys."""
    table = read_parquet(trained.file_path(trained.files[0]), what="dedup train part")
    dim = table.schema.field("centroid").type.list_size
    centroids = np.ascontiguousarray(table.column("centroid").combine_chunks().values.to_numpy().reshape(-1, dim))
    state = {"centroids": centroid_index(centroids, settings), "ref": None, "ref_keys": None,
             "pq": ivf_pq.from_train_part(table, settings.pq)}
    if ref is not None:
        state["ref_keys"], ref_matrix = load_embeddings(ref, settings.batch_rows)
        state["ref"] = flat_index(ref_matrix)
    return state


def centroid_index(centroids: np.ndarray, settings: Settings):
    """The coarse quantizer's index: exact (``flat``, GPU when there is one) or an HNSW graph (``hnsw``: ~log(lists)
    per image instead of lists; built with one thread, so every task builds the same graph)."""
    if settings.quantizer == "flat":
        return flat_index(centroids)
    index = faiss.IndexHNSWFlat(centroids.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(64, 4 * settings.probe)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(centroids)
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def _search(index, matrix: np.ndarray, k: int, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    sims, ids = [], []
    for start in range(0, len(matrix), batch_rows):
        s, i = index.search(matrix[start:start + batch_rows], k)
        sims.append(s)
        ids.append(i)
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(ids)


def assign_parts(pool: LogitsSet, settings: Settings) -> int:
    """How many assign parts: one per ``assign_block`` consecutive logits parts."""
    return -(-pool.num_parts // settings.assign_block)


def _block_rows(pool: LogitsSet, index: int, settings: Settings) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Keys, stored float16 embeddings and row ids of the logits parts of assign part ``index``."""
    keys, stored, gids = [], [], []
    first = index * settings.assign_block
    for part in range(first, min(pool.num_parts, first + settings.assign_block)):
        table = pool.read_part(part, ["key", "embedding"])
        keys.append(table.column("key").combine_chunks())
        stored.append(fixed_list_to_numpy(table.column("embedding"), int(pool.params["embedding_dim"])))
        gids.append((np.int64(part) << 32) + np.arange(table.num_rows, dtype=np.int64))
    return pa.concat_arrays(keys), np.concatenate(stored), np.concatenate(gids)


def assign_part(pool: LogitsSet, index: int, state: dict, settings: Settings, tmp: Path) -> PartResult:
    """The rows of ``assign_block`` logits parts, each with its ``probe`` nearest lists, and their contamination."""
    keys, stored, gids = _block_rows(pool, index, settings)
    matrix = unit(stored)
    _, lists = _search(state["centroids"], matrix, settings.probe, settings.batch_rows)
    n, probe = len(matrix), settings.probe
    row = np.repeat(np.arange(n, dtype=np.int64), probe)
    gid = gids[row]
    flat_lists = lists.reshape(-1).astype(np.int32)
    order = np.lexsort((gid, flat_lists))
    ref_key, ref_sim = _contamination(state, matrix, settings)
    primary = np.tile(np.arange(probe) == 0, n)[order]
    take = pa.array(row[order])
    rows = pa.table({
        "list": pa.array(flat_lists[order]), "gid": pa.array(gid[order]), "primary": pa.array(primary),
        "key": keys.take(take),
        **({"pq_code": ivf_pq.code_column(state["pq"], matrix, row[order])} if state["pq"] is not None
           else {"embedding": to_binary(stored[row[order]])}),
        "ref_key": pc.if_else(pa.array(primary), ref_key.take(take), pa.nulls(len(order), pa.string())),
        "ref_sim": pc.if_else(pa.array(primary), ref_sim.take(take), pa.nulls(len(order), pa.float32())),
    })
    write_by_block(rows, tmp, settings.list_block)
    contaminated = int(pc.count(ref_key).as_py())
    first = index * settings.assign_block
    return PartResult(expected_rows=len(order), input={"logits_parts": [first, first + settings.assign_block]},
                      extra={"images": n, "contaminated": contaminated})


def _contamination(state: dict, matrix: np.ndarray, settings: Settings) -> tuple[pa.Array, pa.Array]:
    """Per row: the most similar reference key and its similarity when >= threshold (else null)."""
    n = len(matrix)
    if state["ref"] is None:
        return pa.nulls(n, pa.string()), pa.nulls(n, pa.float32())
    sim, idx = _search(state["ref"], matrix, 1, settings.batch_rows)
    hit = (sim[:, 0] >= settings.threshold) & (idx[:, 0] >= 0)
    keys = state["ref_keys"].take(pa.array(np.where(hit, idx[:, 0], 0)))
    mask = pa.array(~hit)
    return (pc.if_else(mask, pa.nulls(n, pa.string()), keys),
            pc.if_else(mask, pa.nulls(n, pa.float32()), pa.array(sim[:, 0].astype(np.float32))))


# --- search ------------------------------------------------------------------------------------------------------

class AssignReader:
    """Reads the rows of a range of lists from every assign part (only the row groups that hold them)."""

    COLUMNS = ["list", "gid", "primary", "key", "embedding"]

    def __init__(self, assigned: mf.Manifest, pq: bool = False):
        self.parts, self.schema = [], None
        self.columns = self.COLUMNS[:-1] + ["pq_code" if pq else "embedding"]
        for entry in assigned.files:
            path = assigned.file_path(entry)
            if path.stat().st_size != entry["bytes"]:
                raise InputError(f"{path}: size differs from {assigned.path}; rerun `--step assign` for it")
            handle = open_parquet(path, what="dedup assign part")
            meta, self.schema = handle.metadata, handle.schema_arrow
            column = meta.schema.names.index("list")
            stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
            bounds = np.array([(st.min, st.max) for st in stats], np.int32).reshape(-1, 2)
            self.parts.append((path, bounds))

    def read(self, low: int, high: int) -> pa.Table:
        """Rows with ``low <= list < high``, sorted by (list, gid)."""
        tables = []
        for path, bounds in self.parts:
            groups = np.flatnonzero((bounds[:, 1] >= low) & (bounds[:, 0] < high)).tolist()
            if groups:
                table = open_parquet(path, what="dedup assign part").read_row_groups(groups, columns=self.columns)
                keep = pc.and_(pc.greater_equal(table.column("list"), low), pc.less(table.column("list"), high))
                tables.append(table.filter(keep))
        if not tables:
            return pa.schema([self.schema.field(name) for name in self.columns]).empty_table()
        table = pa.concat_tables(tables)
        return table.sort_by([("list", "ascending"), ("gid", "ascending")])


def search_part(reader: AssignReader, index: int, settings: Settings, tmp: Path, pq=None,
                pool: LogitsSet | None = None) -> PartResult:
    """Pairs at cosine >= threshold among the lists of search part ``index`` (with ``pq``: candidates by the codes,
    re-checked exactly on the embeddings read back from ``pool``)."""
    low = index * settings.list_block
    rows = reader.read(low, min(settings.lists, low + settings.list_block))
    if pq is None:
        stored = from_binary(rows.column("embedding")) if rows.num_rows else np.zeros((0, 1), np.float16)
        table = _pair_table(rows, *list_pairs(rows, settings), lambda idx: stored[idx])
    else:
        codes = ivf_pq.Decoded(pq, rows.column("pq_code")) if rows.num_rows else None
        a, b, _ = list_pairs(rows, settings, codes, settings.threshold - settings.pq_margin)
        gid = rows.column("gid").to_numpy() if rows.num_rows else np.zeros(0, np.int64)
        table = _pair_table(rows, *ivf_pq.recheck(pool, gid, a, b, settings.threshold))
    write_step(table, tmp)
    return PartResult(expected_rows=table.num_rows, input={"lists": [low, low + settings.list_block]},
                      extra={"pairs": table.num_rows, "scanned": rows.num_rows})


def list_pairs(rows: pa.Table, settings: Settings, matrix=None,
               threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index a, row index b, cosine) within ``rows`` for each list: every row against the list's primaries
    (``matrix``: the rows' vectors, by default their unit embeddings; ``threshold``: by default the settings')."""
    if rows.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    matrix = unit(from_binary(rows.column("embedding"))) if matrix is None else matrix
    threshold = settings.threshold if threshold is None else threshold
    lists = rows.column("list").to_numpy()
    primary = rows.column("primary").to_numpy(zero_copy_only=False)
    gid = rows.column("gid").to_numpy()
    starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]])
    ends = np.r_[starts[1:], len(lists)]
    found = [_one_list(matrix, gid, primary, s, e, settings, threshold) for s, e in zip(starts, ends)]
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _one_list(matrix, gid, primary, start, end, settings: Settings, threshold: float):
    base = np.flatnonzero(primary[start:end]) + start
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(base) == 0:
        return empty
    k = min(settings.neighbors + 1, len(base))
    out = [empty]
    for first in range(start, end, settings.batch_rows):
        query = np.arange(first, min(end, first + settings.batch_rows))
        r, c, sim = top_hits(matrix[query], matrix[base], k, threshold)
        own = gid[base][c] != gid[query][r]
        out.append((query[r[own]], base[c[own]], sim[own]))
    return tuple(np.concatenate(parts) for parts in zip(*out))


def top_hits(query: np.ndarray, base: np.ndarray, k: int, threshold: float):
    """(query row, base row, cosine) of each query row's ``k`` nearest base rows that are >= ``threshold``.

    On CPU one GEMM and a threshold (hits are rare, so only they are ranked); with a GPU, faiss's brute-force
    k-NN then the threshold (ties at the k-th place may resolve differently).
    """
    if faiss.get_num_gpus() > 0:
        if not _GPU:
            _GPU.append(faiss.StandardGpuResources())
        sim, idx = faiss.knn_gpu(_GPU[0], query, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        r, c = np.nonzero((sim >= threshold) & (idx >= 0))
        return r, idx[r, c], sim[r, c].astype(np.float32)
    sims = query @ base.T
    r, c = np.nonzero(sims >= threshold)
    sim = sims[r, c]
    order = np.lexsort((c, -sim, r))  # per row: most similar first, then by index
    r, c, sim = r[order], c[order], sim[order]
    run_start = np.flatnonzero(np.r_[True, r[1:] != r[:-1]]) if len(r) else np.zeros(0, np.int64)
    rank = np.arange(len(r)) - np.repeat(run_start, np.diff(np.r_[run_start, len(r)]))
    keep = rank < k
    return r[keep], c[keep], sim[keep].astype(np.float32)


def _pair_table(rows: pa.Table, a: np.ndarray, b: np.ndarray, sim: np.ndarray, stored_of) -> pa.Table:
    """One row per pair (a < b by row id, first of duplicates); ``stored_of(row indices)``: their float16 rows."""
    gid = rows.column("gid").to_numpy() if rows.num_rows else np.zeros(0, np.int64)
    ga, gb = gid[a], gid[b]
    lo, hi = np.where(ga < gb, a, b), np.where(ga < gb, b, a)
    order = np.lexsort((gid[hi], gid[lo]))
    lo, hi, sim = lo[order], hi[order], sim[order]
    first = np.r_[True, (gid[lo][1:] != gid[lo][:-1]) | (gid[hi][1:] != gid[hi][:-1])] if len(lo) else lo > 0
    lo, hi, sim = lo[first], hi[first], sim[first]
    take_lo, take_hi = pa.array(lo), pa.array(hi)
    return pa.table({"a": pa.array(gid[lo]), "b": pa.array(gid[hi]), "sim": pa.array(sim, pa.float32()),
                     "key_a": rows.column("key").take(take_lo), "key_b": rows.column("key").take(take_hi),
                     "emb_a": to_binary(stored_of(lo)), "emb_b": to_binary(stored_of(hi))})

"""Product quantization for the IVF dedup (``--pq M``): codes instead of float16 embeddings in the search step.

- train: a faiss ``ProductQuantizer`` (``M`` sub-quantizers of ``BITS`` bits) on the same seeded unit-vector sample
  as the coarse k-means; its centroids are stored as float32 bytes (``pq`` column, first row) in the train part.
- assign: each row carries its ``pq_code`` (fixed_size_binary[M]) and no embedding.
- search: a list block is held as codes (M bytes per row instead of 2 D); candidate pairs are the rows whose
  symmetric (code against code) similarity, the cosine of the decoded vectors, is at or above
  ``threshold - pq_margin``; each candidate is then re-checked exactly on the images' float16 embeddings read
  back from the logits parts, so a pair is found only when its exact cosine is >= threshold (never a false pair;
  recall depends on M and the margin).
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline.errors import InputError
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import LogitsSet
from stages.artifacts.parquet import read_parquet
from stages.dedup.core import unit

BITS = 8
NITER = 25


def train_pq(sample: np.ndarray, m: int, seed: int) -> bytes:
    """The centroids (M x 2^BITS x D/M float32) of a product quantizer trained on ``sample``, as bytes."""
    dim = sample.shape[1]
    if dim % m:
        raise InputError(f"--pq {m}: must divide the embedding dimension {dim}; give a divisor of {dim}")
    if len(sample) < 2 ** BITS:
        raise InputError(f"--pq {m}: the training sample has {len(sample)} images, {2 ** BITS} or more are needed; "
                         "raise --train-sample or give --pq 0")
    quantizer = faiss.ProductQuantizer(dim, m, BITS)
    quantizer.cp.seed, quantizer.cp.niter, quantizer.verbose = seed, NITER, False
    quantizer.train(np.ascontiguousarray(sample, np.float32))
    return faiss.vector_to_array(quantizer.centroids).astype(np.float32).tobytes()


def load_pq(blob: bytes, dim: int, m: int):
    """The product quantizer stored by ``train_pq``."""
    quantizer = faiss.ProductQuantizer(dim, m, BITS)
    faiss.copy_array_to_vector(np.frombuffer(blob, np.float32).copy(), quantizer.centroids)
    return quantizer


def from_train_part(table: pa.Table, m: int):
    """The product quantizer of a train part's table (None when ``m`` is 0: ``--pq`` off)."""
    if not m:
        return None
    if "pq" not in table.column_names:
        raise InputError("dedup train part has no product quantizer; rerun `--step train` with --pq")
    return load_pq(table.column("pq")[0].as_py(), table.schema.field("centroid").type.list_size, m)


def from_train_step(trained: mf.Manifest, m: int):
    """The product quantizer of the finalized train step (None when ``m`` is 0)."""
    if not m:
        return None
    return from_train_part(read_parquet(trained.file_path(trained.files[0]), what="dedup train part"), m)


def code_column(quantizer, matrix: np.ndarray, rows: np.ndarray) -> pa.FixedSizeBinaryArray:
    """The PQ codes of ``matrix[rows]`` as fixed_size_binary[M] (each image encoded once, not once per copy)."""
    codes = quantizer.compute_codes(np.ascontiguousarray(matrix, np.float32))[rows]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(codes.shape[1]), len(codes),
                                                [None, pa.py_buffer(np.ascontiguousarray(codes).tobytes())])


class Decoded:
    """The rows of a code column, decoded only when indexed (one list's rows at a time, not the block)."""

    def __init__(self, quantizer, column):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        width = array.type.byte_width
        raw = np.frombuffer(array.buffers()[1], np.uint8)[array.offset * width:(array.offset + len(array)) * width]
        self.codes, self.quantizer = raw.reshape(len(array), width), quantizer

    def __getitem__(self, rows) -> np.ndarray:
        return unit(self.quantizer.decode(np.ascontiguousarray(self.codes[rows])))  # cosine: no shrink bias


def read_back(pool: LogitsSet, gids: np.ndarray) -> np.ndarray:
    """The stored float16 embeddings of the sorted row ids ``gids``, read from their logits parts."""
    dim = int(pool.params["embedding_dim"])
    out = np.zeros((len(gids), dim), np.float16)
    parts = gids >> 32
    for part in np.unique(parts):
        at = np.flatnonzero(parts == part)
        stored = fixed_list_to_numpy(pool.read_part(int(part), ["embedding"]).column("embedding"), dim)
        out[at] = stored[(gids[at] & 0xFFFFFFFF).astype(np.int64)]
    return out


def recheck(pool: LogitsSet, gid: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float):
    """Candidate pairs (row indices) kept when their exact cosine is >= threshold, and the embeddings' lookup."""
    rows = np.unique(np.concatenate([a, b]))
    stored = read_back(pool, gid[rows])
    matrix = unit(stored) if len(rows) else np.zeros((0, 1), np.float32)
    at = lambda idx: np.searchsorted(rows, idx)
    sim = np.einsum("ij,ij->i", matrix[at(a)], matrix[at(b)]).astype(np.float32) if len(a) else np.zeros(0, np.float32)
    keep = sim >= threshold
    return a[keep], b[keep], sim[keep], (lambda idx: stored[at(idx)])

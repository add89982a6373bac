"""The logits Parquet contract: Arrow schema, file metadata keys, and the maths of stored soft targets.

One row per sample (per view, once multi-view lands): ``key``, ``shard``, ``topk_index`` (class ids by
logit descending), ``topk_logit`` (raw logits z), ``lse`` = logsumexp(z / T) over all classes, optional
``embedding`` (L2-normalised float16). The softened probability of a stored class is exp(z/T - lse); the
mass of the other classes is 1 - sum of those. Every reader of logits goes through this module.

Schema versions (file metadata ``schema_version``; the manifest's ``params.parquet_schema_version``):

- 1: the columns above.
- 2: adds ``lse1`` (float32, after ``lse``) = logsumexp(z) over all classes, the normaliser at T = 1, so that
  p_1(l|x) = exp(z_l - lse1) ranks or scores at T = 1 what was stored for distillation at T (``kdpipe select
  --rank-temperature 1``). kdpipe's logits stage writes it in every part; it is optional for other producers
  (``has_lse1``). Nothing else changed: version 1 files stay readable (``READ_VERSIONS``), and readers that
  select columns by name read version 2 files unchanged.

Multi-view logits (``--views V``, reserved) will add an int16 ``view`` column after ``shard`` (rows of one
sample adjacent, views ascending) and bump ``SCHEMA_VERSION``; readers select columns by name, never by
position, and today's files (one centre view, no ``view`` column) stay readable as view 0.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from stages.artifacts.arrays import to_numpy

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)  # versions this kdpipe reads (1: no lse1 column)
LSE1 = "lse1"
META_KEY = b"kdpipe"
RESIDUAL_POLICIES = ("exact", "renorm")


def index_type(num_classes: int) -> pa.DataType:
    """int16 when the class ids fit, else int32."""
    return pa.int16() if num_classes <= 32767 else pa.int32()


def arrow_schema(num_classes: int, topk: int, embedding_dim: int | None = None,
                 logit_type: pa.DataType = pa.float32(), metadata: dict | None = None,
                 lse1: bool = False) -> pa.Schema:
    """The Arrow schema of a logits part, with kdpipe's metadata (JSON under the ``kdpipe`` key);
    ``lse1`` adds the T = 1 normaliser column (schema version 2)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("topk_index", pa.list_(index_type(num_classes), topk), nullable=False),
        pa.field("topk_logit", pa.list_(logit_type, topk), nullable=False),
        pa.field("lse", pa.float32(), nullable=False),
    ]
    if lse1:
        fields.append(pa.field(LSE1, pa.float32(), nullable=False))
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float16(), embedding_dim)))
    meta = {META_KEY: json.dumps(metadata or {}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def has_lse1(schema: pa.Schema) -> bool:
    """True when a logits part stores the T = 1 normaliser ``lse1``."""
    return LSE1 in schema.names


def read_metadata(schema: pa.Schema) -> dict:
    """kdpipe's metadata dict of a logits part (schema_version, temperature, topk, num_classes, ids, ...)."""
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed_size_list column as a 2-D numpy array without per-row Python work."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return to_numpy(column.flatten()).reshape(-1, width)


def softened_topk(topk_logit: np.ndarray, lse: np.ndarray, temperature: float) -> np.ndarray:
    """p_T of the stored classes: exp(z/T - lse), shape (N, K)."""
    return np.exp(topk_logit.astype(np.float64) / temperature - lse.astype(np.float64)[:, None])


def residual_mass(probs: np.ndarray) -> np.ndarray:
    """Probability mass of the classes that were not stored: 1 - sum of the stored ones (clipped at 0)."""
    return np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0)


def dense_targets(topk_index: np.ndarray, topk_logit: np.ndarray, lse: np.ndarray, temperature: float,
                  num_classes: int, policy: str = "exact") -> np.ndarray:
    """Dense (N, C) teacher distributions rebuilt from top-K storage.

    Args:
        policy: ``exact`` spreads the residual mass evenly over the C - K other classes (sums to 1 and
            keeps the stored probabilities exact); ``renorm`` drops it and renormalises the top-K.
    """
    if policy not in RESIDUAL_POLICIES:
        raise ValueError(f"residual policy {policy!r} is not one of {RESIDUAL_POLICIES}")
    probs = softened_topk(topk_logit, lse, temperature)
    n, k = probs.shape
    out = np.zeros((n, num_classes), dtype=np.float64)
    if policy == "exact" and num_classes > k:
        out += (residual_mass(probs) / (num_classes - k))[:, None]
    else:
        probs = probs / probs.sum(axis=1, keepdims=True)
    np.put_along_axis(out, topk_index.astype(np.int64), probs, axis=1)
    return out.astype(np.float32)

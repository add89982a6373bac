"""Reshard planning and sample layout: pure functions, no I/O (table-driven tests).

An output shard is a contiguous run of source shards whose selected rows fill about ``shard_size``
samples and ``shard_bytes`` bytes, so each source shard is read once, sequentially, by the one task that
owns its output shard. Within an output shard, samples are put in a seeded shuffled order (classes mixed).
"""

from __future__ import annotations

import json

import numpy as np


def plan_output_shards(counts: list[int], sizes: list[float], shard_size: int, shard_bytes: float) -> list[range]:
    """Group consecutive source shards into output shards.

    Args:
        counts: selected rows per source shard (index = source shard index).
        sizes: estimated bytes those rows will take in the output, per source shard.
        shard_size: samples per output shard; a run is closed before it would exceed this.
        shard_bytes: bytes per output shard, about; a run is closed before it would exceed this.

    Returns:
        One ``range`` of source shard indices per output shard. Source shards without selected rows are
        never a range's first or last element; a source shard that alone exceeds the limits is a run of
        its own (output shards never split a source shard).
    """
    plan: list[range] = []
    start = last = None
    rows = used = 0
    for shard, (count, size) in enumerate(zip(counts, sizes)):
        if count <= 0:
            continue
        if start is not None and (rows + count > shard_size or used + size > shard_bytes):
            plan.append(range(start, last + 1))
            start = None
        if start is None:
            start, rows, used = shard, 0, 0.0
        last, rows, used = shard, rows + count, used + size
    if start is not None:
        plan.append(range(start, last + 1))
    return plan


def plan_waves(part_rows: list[int], parts: list[int], max_rows: int) -> list[list[int]]:
    """Group a task's parts (in order) into waves of at most ``max_rows`` selected rows (at least one part each).

    A wave's rows are read from the selection in one streaming scan, so memory is bounded by ``max_rows``
    and the selection is scanned once per wave, not once per part.
    """
    waves: list[list[int]] = []
    rows = 0
    for part in parts:
        if waves and rows + part_rows[part] <= max_rows:
            waves[-1].append(part)
            rows += part_rows[part]
        else:
            waves.append([part])
            rows = part_rows[part]
    return waves


def sample_key(source_key: str, label: int, dup: int) -> str:
    """``<source key>__l<label>`` plus ``__d<dup>`` for balance copies: unique per selected row."""
    return f"{source_key}__l{label}" + (f"__d{dup}" if dup else "")


def shuffle_order(n: int, seed: int, part: int) -> np.ndarray:
    """The deterministic permutation of an output shard's ``n`` canonically sorted samples."""
    return np.random.default_rng([seed, part]).permutation(n)


def targets_json(row: dict, temperature: float, num_classes: int, views: list[dict] | None = None) -> bytes:
    """The ``json`` member of a training sample: score, provenance and the soft targets (compact, sorted), with
    the class count C so that a reader can build dense targets from the sample alone.

    ``views`` (multi-view logits): every stored view's parameters and targets (``artifacts.views.view_record``),
    under ``"views"``; the top-level targets stay view 0's.
    """
    body = {"score": row["score"], "source_key": row["key"], "source_shard": row["shard"], "dup": row["dup"],
            "topk_index": list(row["topk_index"]), "topk_logit": list(row["topk_logit"]), "lse": row["lse"],
            "temperature": temperature, "num_classes": num_classes}
    if views is not None:
        body["views"] = views
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

"""Exact streaming per-class top-K: memory O(classes x K) plus one batch, never O(images).

``ClassTopK`` keeps, for every class l, a running admission threshold ``thr[l]``: once the class holds its
quota K_l, a new candidate can only enter if its score is >= the K_l-th best score seen so far. Candidates
that pass are appended to a buffer; when the buffer exceeds ``cap`` rows it is compacted back to at most
K_l rows per class. Compaction sorts the buffer's (label, score) composite values (no argsort), reads off
each class's K_l-th score s*, keeps every row above s* and breaks ties at s* by key ascending (the few
rows in such a tie are the only ones whose keys are compared). Thresholds only ever rise, so the final
rows are exactly those of a full sort of all candidates by (label, score desc, key asc).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SORT_ORDER = [("label", "ascending"), ("score", "descending"), ("key", "ascending")]


def composite(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """int64 values ordering rows by label ascending, then score descending (scores are >= 0)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32).astype(np.int64)
    return (labels.astype(np.int64) << 32) | (np.int64(0xFFFFFFFF) - bits)


class ClassTopK:
    """Per-class top-K_l accumulator over (label, score, payload row) candidates.

    Args:
        quotas: K_l per class (int array of length C); 0 admits nothing for that class.
        floor: the minimum score admitted (``--min-score``); thresholds never go below it.
        cap: compact when the buffer holds more rows than this (default 2 x sum K_l, at least 65536).
    """

    def __init__(self, quotas: np.ndarray, floor: float = 0.0, cap: int | None = None):
        self.quotas = np.asarray(quotas, dtype=np.int64)
        self.floor = np.float32(floor)
        self.thr = np.where(self.quotas > 0, self.floor, np.float32(np.inf)).astype(np.float32)
        self.cap = cap if cap is not None else max(2 * int(self.quotas.sum()), 65536)
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._payload: list[pa.Table] = []
        self._rows = 0
        self.compactions = 0

    @property
    def buffered(self) -> int:
        """Rows held now (at most ``cap`` plus one batch's admitted candidates)."""
        return self._rows

    def add(self, labels: np.ndarray, scores: np.ndarray, payload: pa.Table) -> None:
        """Offer candidates (``payload`` has one row per candidate, with a ``key`` column)."""
        keep = scores >= self.thr[labels]
        if not keep.all():
            where = np.flatnonzero(keep)
            labels, scores, payload = labels[where], scores[where], payload.take(pa.array(where))
        if len(labels) == 0:
            return
        self._labels.append(labels.astype(np.int32, copy=False))
        self._scores.append(scores.astype(np.float32, copy=False))
        self._payload.append(payload)
        self._rows += len(labels)
        if self._rows > self.cap:
            self.compact()

    def compact(self) -> None:
        """Reduce the buffer to the exact top K_l rows per class and raise the thresholds."""
        labels, scores, payload = self._concat()
        if len(labels) == 0:
            return
        keep, kth = _exact_keep(labels, scores, payload.column("key"), self.quotas)
        labels, scores = labels[keep], scores[keep]
        payload = payload.take(pa.array(keep))
        full = ~np.isnan(kth)
        self.thr[full] = np.maximum(self.thr[full], kth[full].astype(np.float32))
        self._labels, self._scores, self._payload = [labels], [scores], [payload]
        self._rows = len(labels)
        self.compactions += 1

    def _concat(self) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        if not self._labels:
            return np.empty(0, np.int32), np.empty(0, np.float32), pa.table({"key": pa.array([], pa.string())})
        labels = np.concatenate(self._labels)
        scores = np.concatenate(self._scores)
        payload = pa.concat_tables(self._payload)
        return labels, scores, payload

    def result(self) -> pa.Table:
        """The exact top rows as a table with ``label``, ``score`` and the payload, in ``SORT_ORDER``."""
        self.compact()
        labels, scores, payload = self._concat()
        order = sorted_order(labels, scores, payload.column("key"))
        table = payload.take(pa.array(order))
        table = table.append_column("label", pa.array(labels[order], pa.int32()))
        return table.append_column("score", pa.array(scores[order], pa.float32()))


def sorted_order(labels: np.ndarray, scores: np.ndarray, keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row order by (label asc, score desc, key asc): a numeric sort, then keys compared only within ties."""
    comp = composite(labels, scores)
    order = np.argsort(comp, kind="stable")
    ordered = comp[order]
    equal = ordered[1:] == ordered[:-1]
    if equal.any():
        tied = np.flatnonzero(np.r_[equal, False] | np.r_[False, equal])
        rows = order[tied]
        sub = pa.table({"c": comp[rows], "k": pc.take(keys, pa.array(rows))})
        order[tied] = rows[pc.sort_indices(sub, sort_keys=[("c", "ascending"), ("k", "ascending")]).to_numpy()]
    return order


def _exact_keep(labels: np.ndarray, scores: np.ndarray, keys: pa.ChunkedArray,
                quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the exact top K_l rows per class, and each full class's K_l-th score (NaN if not full).

    Rows strictly above the K_l-th score s* are kept; rows equal to s* are kept by key ascending until the
    class holds K_l rows.
    """
    comp = composite(labels, scores)
    ordered = np.sort(comp)
    num_classes = len(quotas)
    starts = np.searchsorted(ordered, np.arange(num_classes, dtype=np.int64) << 32)
    ends = np.append(starts[1:], len(ordered))
    full = (ends - starts) > quotas
    full &= quotas > 0
    kth = np.full(num_classes, np.nan)
    boundary = ordered[starts[full] + quotas[full] - 1]
    kth[full] = (np.int64(0xFFFFFFFF) - (boundary & 0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    cut = np.full(num_classes, np.iinfo(np.int64).max, np.int64)  # rows with comp < cut[label] kept
    cut[full] = boundary
    cut[quotas <= 0] = np.iinfo(np.int64).min
    keep = comp < cut[labels]
    _break_ties(comp, ordered, starts, quotas, full, boundary, keys, keep)
    keep_all = ~full & (quotas > 0)
    keep |= keep_all[labels]
    return np.flatnonzero(keep), kth


def _break_ties(comp, ordered, starts, quotas, full, boundary, keys, keep) -> None:
    """Admit rows equal to each full class's K_l-th composite, by key ascending, up to K_l rows."""
    classes = np.flatnonzero(full)
    room = np.zeros(len(quotas), np.int64)
    room[classes] = quotas[classes] - (np.searchsorted(ordered, boundary, side="left") - starts[classes])
    target = np.full(len(quotas), -1, np.int64)  # composites are never negative
    target[classes] = boundary
    labels = (comp >> 32).astype(np.int64)
    tied = np.flatnonzero(comp == target[labels])
    tied_labels = labels[tied]
    counts = np.bincount(tied_labels, minlength=len(quotas))
    fits = counts <= room
    keep[tied[fits[tied_labels]]] = True
    for cls in np.flatnonzero(~fits):
        rows = tied[tied_labels == cls]
        order = pc.sort_indices(pc.take(keys, pa.array(rows))).to_numpy()
        keep[rows[order[: room[cls]]]] = True

"""Exact streaming per-class top-K: memory O(classes x K) plus one batch, never O(images).

``ClassTopK`` keeps, for every class l, a running admission threshold ``thr[l]``: once the class holds its
quota K_l, a new candidate can only enter if its score is >= the K_l-th best score seen so far. Candidates
that pass are appended to a buffer; when the buffer exceeds ``cap`` rows it is compacted back to at most
K_l rows per class. Compaction groups rows by label (radix sort), finds each class's K_l-th score s* with
``np.partition``, keeps every row above s* and breaks ties at s* by key ascending (the few rows in such
a tie are the only ones whose keys are compared). Thresholds only ever rise, so the final
rows are exactly those of a full sort of all candidates by (label, score desc, key asc).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.artifacts.arrays import to_arrow, to_numpy

TAKE_SPLIT = 1 << 18  # rows from which ``take_halves`` splits the gather over two threads


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
        schema: the payload's schema (for an empty result); default a lone ``key`` column.
    """

    def __init__(self, quotas: np.ndarray, floor: float = 0.0, cap: int | None = None,
                 schema: pa.Schema | None = None):
        self.schema = schema or pa.schema([pa.field("key", pa.string())])
        self.quotas = np.asarray(quotas, dtype=np.int64)
        self.floor = np.float32(floor)
        self.thr = np.where(self.quotas > 0, self.floor, np.float32(np.inf)).astype(np.float32)
        self.cap = cap if cap is not None else max(2 * int(self.quotas.sum()), 65536)
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._payload: list[pa.Table] = []
        self._rows = 0
        self.compactions = 0

    def add(self, labels: np.ndarray, scores: np.ndarray, payload: pa.Table) -> None:
        """Offer candidates (``payload`` has one row per candidate, with a ``key`` column)."""
        keep = scores >= self.thr[labels]
        if not keep.all():
            where = np.flatnonzero(keep)
            labels, scores, payload = labels[where], scores[where], payload.take(to_arrow(where))
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
        payload = payload.take(to_arrow(keep))
        full = ~np.isnan(kth)
        self.thr[full] = np.maximum(self.thr[full], kth[full])
        self._labels, self._scores, self._payload = [labels], [scores], [payload]
        self._rows = len(labels)
        self.compactions += 1

    def _concat(self) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        if not self._labels:
            return np.empty(0, np.int32), np.empty(0, np.float32), self.schema.empty_table()
        labels = np.concatenate(self._labels)
        scores = np.concatenate(self._scores)
        payload = pa.concat_tables(self._payload).combine_chunks()
        return labels, scores, payload

    def result(self) -> pa.Table:
        """The exact top rows as a table with ``label``, ``score`` and the payload, by (label asc, score desc, key asc)."""
        self.compact()
        labels, scores, payload = self._concat()
        order = sorted_order(labels, scores, payload.column("key"), len(self.quotas))
        table = payload.take(to_arrow(order))
        table = table.append_column("label", to_arrow(labels[order], pa.int32()))
        return table.append_column("score", to_arrow(scores[order], pa.float32()))


class ScoreTopK:
    """Per-class top-K_l by score alone over (label, score, row id) candidates, numpy only (no payload, no keys).

    Thresholds come from a per-class histogram of the admitted scores (``ScoreBins``): once a class has K_l
    candidates at or above a bin's lower edge, nothing below that edge can be among its K_l best, so the edge is
    its admission threshold. The histogram is updated with every ``add`` (no sort), so thresholds rise from the
    first batches on; the buffer is filtered by them when it exceeds ``cap`` rows. ``result`` trims once to each
    class's exact K_l-th score, keeping every row tied with it: keys, which break those ties, are not at hand.
    The rows kept are thus the exact top K_l plus the ties at the boundary; ``exact_rows`` over them, with
    their payload, gives the exact rows. Memory: buffers of at most ``cap`` rows (twice sum K_l, or the
    ``expected`` candidates when fewer) at 16 bytes a row, filled in place, the histogram (classes x
    ``ScoreBins.count`` x 8 bytes) and the exact trim's temporaries (14 bytes a row): O(classes x K) plus the ties
    at each class's boundary.
    """

    def __init__(self, quotas: np.ndarray, floor: float = 0.0, cap: int | None = None, expected: int = 0):
        self.quotas = np.asarray(quotas, dtype=np.int64)
        self.thr = np.where(self.quotas > 0, np.float32(floor), np.float32(np.inf)).astype(np.float32)
        self.expected = expected  # candidates the caller expects at most: the buffers' first size, if below cap
        total = int(self.quotas.sum())
        self.slack = max(total, 65536) if cap is None else max(cap // 4, 1)  # the least room after a filter
        self.cap = total + self.slack if cap is None else cap
        self.bins = ScoreBins(len(self.quotas))
        self._buffers = (np.empty(0, np.int32), np.empty(0, np.float32), np.empty(0, np.int64))
        self._rows = 0
        self.compactions = 0

    def add(self, labels: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Offer candidates: class ``labels``, ``scores`` and int64 row ``ids`` (one per candidate)."""
        keep = scores >= self.thr[labels]
        if not keep.all():
            labels, scores, ids = labels[keep], scores[keep], ids[keep]
        self.bins.add(labels, scores)
        self.thr = np.maximum(self.thr, self.bins.thresholds(self.quotas))
        while len(labels):
            room = min(len(labels), self.cap + 1 - self._rows)
            self._reserve(self._rows + room)
            for buffer, values in zip(self._buffers, (labels, scores, ids)):
                buffer[self._rows:self._rows + room] = values[:room]
            self._rows += room
            labels, scores, ids = labels[room:], scores[room:], ids[room:]
            if self._rows > self.cap:
                self.compact()

    def _reserve(self, rows: int) -> None:
        if rows > len(self._buffers[0]):  # grows geometrically up to ``cap`` (fewer candidates than quotas: less)
            size = min(self.cap + 1, max(rows, 2 * len(self._buffers[0]), self.expected or 65536))
            grown = tuple(np.empty(size, b.dtype) for b in self._buffers)
            for old, new in zip(self._buffers, grown):
                new[:self._rows] = old[:self._rows]
            self._buffers = grown

    def compact(self, exact: bool = False) -> None:
        """Drop every row below its class's threshold; when that leaves less than half of ``slack`` free (many
        scores in one bin) or with ``exact``, raise the thresholds to each full class's exact K_l-th score first.
        ``cap`` then grows to leave at least ``slack`` free (ties at the boundary), so filtering stays amortised."""
        self._filter()
        if exact or self._rows > self.cap - self.slack // 2:
            labels, scores = self._buffers[0][:self._rows], self._buffers[1][:self._rows]
            self.thr = np.maximum(self.thr, kth_scores(labels, scores, self.quotas))
            self._filter()
        self.cap = max(self.cap, self._rows + self.slack)
        self.compactions += 1

    def _filter(self) -> None:
        labels, scores = self._buffers[0][:self._rows], self._buffers[1][:self._rows]
        keep = scores >= self.thr[labels]
        kept = int(keep.sum())
        if kept < self._rows:
            for buffer in self._buffers:
                buffer[:kept] = buffer[:self._rows][keep]
        self._rows = kept

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, scores, ids) of the rows kept, by id ascending: the exact top K_l rows and their ties.

        Call it once, at the end: it releases the buffers (the next step needs the memory).
        """
        self.compact(exact=True)
        labels, scores, ids = (b[:self._rows] for b in self._buffers)
        self._buffers, self._rows = tuple(b[:0].copy() for b in self._buffers), 0
        if len(ids) < 2 or (ids[1:] >= ids[:-1]).all():  # rows arrive in id order, and filtering keeps it
            return labels.copy(), scores.copy(), ids.copy()
        order = np.argsort(ids, kind="stable")
        return labels[order], scores[order], ids[order]


class ScoreBins:
    """Per-class histogram of scores in [0, 1]: 16 bins an octave (a bin is at most 1/16 of its lower edge wide)
    down to 2**-20, one bin below.

    A score's bin is read off its float32 bits (exponent and top 4 mantissa bits), so binning is one shift.
    """

    PER_OCTAVE, OCTAVES = 16, 20
    _SHIFT = 23 - 4  # float32 bits >> _SHIFT: the exponent and the top 4 of 23 mantissa bits (16 bins an octave)
    _TOP = int(np.float32(1.0).view(np.uint32)) >> _SHIFT  # the bin of 1.0 (a bin of its own)
    count = PER_OCTAVE * OCTAVES + 1

    def __init__(self, num_classes: int):
        self.counts = np.zeros((num_classes, self.count), np.int64)  # per class, bins from the top (1.0) down
        bits = (np.uint32(self._TOP) - np.arange(self.count, dtype=np.uint32)) << self._SHIFT
        self.floors = bits.view(np.float32).copy()
        self.floors[-1] = 0  # the bottom bin holds everything below 2**-20

    def add(self, labels: np.ndarray, scores: np.ndarray) -> None:
        """Count ``scores`` (float32 in [0, 1]) in their classes' bins."""
        below_top = self._TOP - (np.ascontiguousarray(scores, np.float32).view(np.int32) >> self._SHIFT)
        cells = labels.astype(np.int64) * self.count + np.clip(below_top, 0, self.count - 1)
        self.counts.ravel()[:] += np.bincount(cells, minlength=self.counts.size)

    def thresholds(self, quotas: np.ndarray) -> np.ndarray:
        """Per class, the highest bin floor with at least K_l scores at or above it (-inf where none has)."""
        above = np.cumsum(self.counts, axis=1) >= quotas[:, None]
        reached = above[:, -1] & (quotas > 0)
        return np.where(reached, self.floors[np.argmax(above, axis=1)], np.float32(-np.inf)).astype(np.float32)


def kth_scores(labels: np.ndarray, scores: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Each class's K_l-th largest score where it holds more than K_l rows, else -inf (``np.partition`` per
    class after a radix grouping by label)."""
    order, counts, starts = group_by_label(labels, len(quotas))
    kth = np.full(len(quotas), -np.inf, np.float32)
    grouped = scores[order]
    del order
    for cls in np.flatnonzero((counts > quotas) & (quotas > 0)):
        at = counts[cls] - quotas[cls]
        kth[cls] = np.partition(grouped[starts[cls]:starts[cls] + counts[cls]], at)[at]
    return kth


def group_by_label(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order grouping rows by label (a stable radix sort on 16-bit labels), rows per class, starts."""
    small = labels.astype(np.uint16) if num_classes <= 65536 else labels
    counts = np.bincount(labels, minlength=num_classes)
    return np.argsort(small, kind="stable"), counts, np.cumsum(counts) - counts


def exact_rows(labels: np.ndarray, scores: np.ndarray, payload: pa.Table, quotas: np.ndarray) -> pa.Table:
    """What ``ClassTopK.result`` gives for these candidates at once (they fit in memory: e.g. ``ScoreTopK``'s
    survivors with their payload), with one sort and one take of the payload: the exact top K_l rows with
    ``label`` and ``score``, by (label asc, score desc, key asc)."""
    rows = first_per_class(labels, sorted_order(labels, scores, payload.column("key"), len(quotas)), quotas)
    table = take_halves(payload, rows)
    table = table.append_column("label", to_arrow(labels[rows], pa.int32()))
    return table.append_column("score", to_arrow(scores[rows], pa.float32()))


def first_per_class(labels: np.ndarray, order: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """The first K_l rows of each class in ``order`` (rows grouped by label), in that order (its temporaries are
    gone before the caller's take of the payload)."""
    ordered = labels[order]
    counts = np.bincount(ordered, minlength=len(quotas))
    rank = np.arange(len(order)) - (np.cumsum(counts) - counts)[ordered]
    return order[rank < np.asarray(quotas)[ordered]]


def take_halves(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)`` as two takes on two threads (Arrow's gather releases the GIL; a random-order take of
    millions of keys is bound by memory latency, not by one core); the result has a chunk per half."""
    if len(rows) < TAKE_SPLIT:
        return table.take(to_arrow(rows))
    half = len(rows) // 2
    with ThreadPoolExecutor(2, thread_name_prefix="select-take") as pool:
        parts = list(pool.map(lambda r: table.take(to_arrow(r)), (rows[:half], rows[half:])))
    return pa.concat_tables(parts)


def sorted_order(labels: np.ndarray, scores: np.ndarray, keys: pa.ChunkedArray | pa.Array,
                 num_classes: int, key_rows: np.ndarray | None = None) -> np.ndarray:
    """Row order by (label asc, score desc, key asc): one numeric sort, keys compared only in ties.

    Row i's key is ``keys[i]``, or ``keys[key_rows[i]]`` when ``key_rows`` is given. Rows equal in all three
    keep their input order (the numeric sort need not be stable: ties are re-sorted by key, then row).
    """
    comp = composite(labels, scores)
    order = np.argsort(comp)
    comp = comp[order]
    equal = comp[1:] == comp[:-1]
    if equal.any():
        tied = np.flatnonzero(np.r_[equal, False] | np.r_[False, equal])
        rows = order[tied]
        sub = pa.table({"c": to_arrow(comp[tied]), "r": to_arrow(rows),
                        "k": pc.take(keys, to_arrow(rows if key_rows is None else key_rows[rows]))})
        order[tied] = rows[to_numpy(pc.sort_indices(sub, sort_keys=[("c", "ascending"), ("k", "ascending"),
                                                                    ("r", "ascending")]))]
    return order


def _exact_keep(labels: np.ndarray, scores: np.ndarray, keys: pa.ChunkedArray,
                quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the exact top K_l rows per class, and each full class's K_l-th score (NaN if not full).

    Each full class's K_l-th largest score s* comes from ``np.partition`` of its rows; rows above s* are
    kept, rows equal to s* are kept by key ascending until the class holds K_l rows.
    """
    num_classes = len(quotas)
    order, counts, starts = group_by_label(labels, num_classes)
    full = (counts > quotas) & (quotas > 0)
    kth = np.full(num_classes, np.nan, np.float32)
    grouped = scores[order]
    for cls in np.flatnonzero(full):
        at = counts[cls] - quotas[cls]
        kth[cls] = np.partition(grouped[starts[cls]:starts[cls] + counts[cls]], at)[at]
    bound = kth[labels]
    with np.errstate(invalid="ignore"):
        above = scores > bound
        keep = above | (~full & (quotas > 0))[labels]
        tied = np.flatnonzero(scores == bound)
    room = quotas - np.bincount(labels[above], minlength=num_classes)
    tied_labels = labels[tied]
    fits = np.bincount(tied_labels, minlength=num_classes) <= room
    keep[tied[fits[tied_labels]]] = True
    for cls in np.flatnonzero(~fits):
        rows = tied[tied_labels == cls]
        by_key = to_numpy(pc.sort_indices(pc.take(keys, to_arrow(rows))))
        keep[rows[by_key[: room[cls]]]] = True
    return np.flatnonzero(keep), kth

"""Reading logits for a select map task: the first pass's batches from parts read in parallel, and the
survivors' payload.

``parallel_parts`` runs a per-part stream on ``READERS`` threads, each taking the next unread part: the map's
first pass reads, checks and scores logits batches there (Parquet decoding, sha256 and numpy release the GIL)
while the main thread accumulates them in the order they come (ranking does not depend on it).

``fetch_payload``, the second pass: the first ranks candidates by numbers alone (``ScoreTopK``: label, score,
row id); only the rows that survive it (the per-class top K_l and the ties at the boundary) need their key,
shard and soft targets. They are read here from their logits parts (two at a time), row group by row group
(groups without a survivor are skipped), a batch at a time, so memory is the survivors' payload plus two
batches. Each part is opened through ``LogitsSet.open_part`` again (size, sha256 and metadata): the bytes
are those the first pass checked.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa

from stages.artifacts.arrays import to_arrow
from stages.artifacts.logits_reader import LogitsSet

ROW_BITS = 32  # a row id is (logits part << 32) + row within the part
READERS = 2  # logits parts read at once by the second pass
T = TypeVar("T")
_END = object()


class _Failed:
    """A worker's exception, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def parallel_parts(parts: Iterable[int], produce: Callable[[int], Iterator[T]], workers: int = READERS) -> Iterator[T]:
    """Every item of ``produce(part)`` for every part, ``workers`` parts at a time on threads, in arrival order.

    A worker's exception is raised here (the first to arrive); then, as when the consumer stops early, the
    workers stop at their next item and are joined. Memory: ``2 x workers`` items in flight.
    """
    items: queue.Queue = queue.Queue(maxsize=2 * workers)
    todo, lock, stop = iter(list(parts)), threading.Lock(), threading.Event()
    threads = [threading.Thread(target=_work, args=(todo, lock, produce, items, stop), daemon=True,
                                name=f"select-read-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield from _drain(items, len(threads))
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _drain(items: queue.Queue, workers: int) -> Iterator:
    done = 0
    while done < workers:
        item = items.get()
        if item is _END:
            done += 1
        elif isinstance(item, _Failed):
            raise item.error
        else:
            yield item


def _work(todo: Iterator[int], lock: threading.Lock, produce: Callable, items: queue.Queue,
          stop: threading.Event) -> None:
    """One worker: the next unread part's items into ``items`` until no part is left or ``stop``."""
    try:
        while not stop.is_set():
            with lock:
                part = next(todo, None)
            if part is None:
                break
            for item in produce(part):
                if not _put(items, item, stop):
                    return
    except BaseException as exc:  # carried to the consumer, which raises it
        _put(items, _Failed(exc), stop)
    finally:
        _put(items, _END, stop)


def _put(items: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped (then False): never blocks a worker for good."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def numbered_batches(logits_set: LogitsSet, parts: range, columns: list[str],
                     batch_rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row id of the first row, batch) of logits ``parts`` in order (``LogitsSet.iter_batches``, rows checked)."""
    for part in parts:
        offset = 0
        for batch in logits_set.iter_batches(columns=columns, batch_rows=batch_rows, parts=[part]):
            yield (part << ROW_BITS) + offset, batch
            offset += batch.num_rows


def fetch_payload(logits_set: LogitsSet, ids: np.ndarray, schema: pa.Schema, id_column: str,
                  batch_rows: int) -> pa.Table:
    """The ``schema`` columns (all but ``id_column``) of the rows ``ids`` (ascending), with ``id_column``."""
    columns = [name for name in schema.names if name != id_column]
    parts, rows = ids >> ROW_BITS, ids & ((1 << ROW_BITS) - 1)
    bounds = np.searchsorted(parts, np.unique(parts)[:, None] + [0, 1])
    read = lambda lo_hi: _part_rows(logits_set, int(parts[lo_hi[0]]), rows[lo_hi[0]:lo_hi[1]], columns, batch_rows)
    with ThreadPoolExecutor(READERS, thread_name_prefix="select-fetch") as pool:  # parts decode in parallel
        batches = [batch for found in pool.map(read, bounds) for batch in found]
    payload = pa.Table.from_batches(batches, schema.remove(schema.get_field_index(id_column)))
    return payload.append_column(schema.field(id_column), to_arrow(ids, pa.int64()))


def _part_rows(logits_set: LogitsSet, part: int, rows: np.ndarray, columns: list[str],
               batch_rows: int) -> list[pa.RecordBatch]:
    """The ``columns`` of ``rows`` (ascending) of logits part ``part``, as record batches."""
    handle = logits_set.open_part(part)
    out, start = [], 0
    for group in range(handle.metadata.num_row_groups):
        size = handle.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(rows, [start, start + size])
        if hi > lo:
            offset = start
            for batch in handle.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                a, b = np.searchsorted(rows, [offset, offset + batch.num_rows])
                if b > a:
                    out.append(batch.take(to_arrow(rows[a:b] - offset)))
                offset += batch.num_rows
        start += size
    return out

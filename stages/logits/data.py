"""Data loading for the logits stage: shards decoded in DataLoader workers, overlapping the forward pass.

One ``DataLoader`` serves a task's whole block of pending parts. Every worker reads each shard with
``stages.shardio.read_shard`` (every sample accounted for) and decodes the samples whose position in the
shard is ``position % workers == worker``; so a part's decode is spread over all workers and the shard is
never split on disk. Workers send ``Record``-shaped dicts (pixels of a few samples, their positions and keys,
and the decode failures), and one end-of-part record each with the shard's integrity verdict. The main
process restores shard order by position (``PartFeed``), so nothing downstream depends on the number of
workers, on the loader batch or on the prefetch depth.

Memory is bounded by ``workers * prefetch * loader_batch`` decoded images, never by a shard's size; except
with multi-view mixup logits (``spec.mixup``), where each worker holds its shard's encoded images to decode
mixup partners (and decodes every image of the shard once to learn which ones can be partners).
"""

from __future__ import annotations

import io
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import PartFailed
from stages import imaging
from stages.shardio import ShardStats, read_shard
from stages.views.render import PartnerPool, render_view, sample_views
from stages.views.spec import AugSpec

log = logging.getLogger(__name__)
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ShardRef:
    """A dataset shard as the manifest lists it: part index, local path, sha256, sample count."""

    index: int
    path: str
    sha256: str
    samples: int


class ShardBlock(IterableDataset):
    """The pending shards of one task, decoded to centre views (HWC uint8) in stride order per worker.

    Args:
        shards: the pending shards, in the order their parts are committed.
        preprocess: how the model sees an image; a tuple (an ensemble): each sample gives a tuple of views.
        loader_batch: samples per record a worker sends (does not change any result).
        max_pixels: the decode policy's pixel limit.
        raw_jpeg: send JPEG bytes undecoded (decoded later on the GPU); other formats decode here.
        spec: multi-view logits (``stages.views``): each sample gives ``spec.views`` rows, views 0..V-1 of
            the sample at shard position p sit at row positions ``p*V .. p*V+V-1`` (so the compute batches,
            and hence the bytes, still depend on the shard and the batch size only).
    """

    def __init__(self, shards: list[ShardRef], preprocess: imaging.Preprocess, loader_batch: int = 32,
                 max_pixels: int = imaging.DEFAULT_MAX_PIXELS, raw_jpeg: bool = False, spec: AugSpec | None = None):
        self.shards, self.pp, self.loader_batch = list(shards), preprocess, max(1, int(loader_batch))
        self.max_pixels, self.raw_jpeg, self.spec = max_pixels, raw_jpeg and spec is None, spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for shard in self.shards:
            yield from self._shard(shard, worker, workers)

    def _shard(self, shard: ShardRef, worker: int, workers: int) -> Iterator[dict]:
        stats = ShardStats(shard.path)
        batch = _Batch(shard.index, worker)
        error = None
        try:
            samples = read_shard(shard.path, stats, shard.sha256, shard.samples)
            decode = self._decode_into
            if self.spec is not None:
                samples = list(samples) if self.spec.mixup else samples  # mixup: partners from the whole shard
                decode = _ViewDecoder(self, samples if self.spec.mixup else None).decode_into
            for position, (key, fields) in enumerate(samples):
                if position % workers == worker:
                    decode(batch, position, key, fields)
                    if len(batch) >= self.loader_batch:
                        yield batch.record()
                        batch = _Batch(shard.index, worker)
        except PartFailed as exc:
            error = [exc.reason, str(exc)]
        except OSError as exc:
            error = ["unreadable_tar", f"{shard.path}: {exc}"]
        if len(batch):
            yield batch.record()
        rows = stats.yielded * (1 if self.spec is None else self.spec.views)  # row positions of the part
        yield batch.end(error, rows, stats.failures if worker == 0 else {})

    def _decode_into(self, batch: "_Batch", position: int, key: str, fields: dict) -> None:
        try:
            data = imaging.find_image(fields)
            if self.raw_jpeg and data.startswith(JPEG_MAGIC):
                check_header(data, self.max_pixels)
                batch.add_raw(position, key, data)
            else:
                batch.add(position, key, imaging.centre_views(data, self.pp, self.max_pixels)
                          if isinstance(self.pp, tuple) else imaging.centre_view(data, self.pp, self.max_pixels))
        except imaging.SampleError as exc:
            batch.fail(position, key, exc.reason)


class _ViewDecoder:
    """Renders the V views of a sample into a worker's record (rows ``p*V + v``; see ``ShardBlock``).

    With mixup, partners come from the keys of the shard that decode: the worker first reads the whole
    shard (holding its encoded images: memory bounded by the shard's size) and decodes each image once to
    learn that pool, exactly like ``views.render_shard_views``; every worker computes the same pool.
    """

    def __init__(self, block: ShardBlock, samples: list | None):
        self.block, self.spec = block, block.spec
        self.encoded: dict[str, bytes] | None = None
        if samples is not None:
            self.encoded = {}
            for key, fields in samples:
                try:
                    data = imaging.find_image(fields)
                    imaging.decode(data, block.max_pixels)
                    self.encoded[key] = data
                except imaging.SampleError:
                    pass
            self.pool = PartnerPool(self.encoded)

    def decode_into(self, batch: "_Batch", position: int, key: str, fields: dict) -> None:
        V, pp = self.spec.views, self.block.pp
        try:
            img = imaging.decode(imaging.find_image(fields), self.block.max_pixels)
        except imaging.SampleError as exc:
            batch.fail(position * V, key, exc.reason)
            for v in range(1, V):
                batch.fail(position * V + v, key, SKIP)
            return
        pool = None if self.encoded is None else self.pool
        for view in sample_views(self.spec, key, img.width, img.height, pool, pp=pp):
            partner = None
            if view.partner is not None:
                partner = imaging.decode(self.encoded[view.partner], self.block.max_pixels)
            batch.add(position * V + view.index, key, render_view(img, view, pp, partner), view)


SKIP = ""  # the failure reason of views 1..V-1 of an image that failed (counted once, on view 0's row)


def check_header(data: bytes, max_pixels: int) -> None:
    """Format and pixel-limit checks of the decode policy without decoding pixels (raises ``SampleError``)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            imaging.check_header(img, max_pixels)  # the policy's own header rule
    except imaging.SampleError:
        raise
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise imaging.SampleError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


class _Batch:
    """A worker's record under construction."""

    def __init__(self, part: int, worker: int):
        self.part, self.worker = part, worker
        self.positions: list[int] = []
        self.keys: list[str] = []
        self.pixels: list[np.ndarray] = []
        self.views: list = []  # stages.views.View per pixels entry (None for single-view logits)
        self.raw: list[tuple[int, str, bytes]] = []
        self.failed: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self.positions) + len(self.raw) + len(self.failed)

    def add(self, position: int, key: str, pixels: np.ndarray, view=None) -> None:
        self.positions.append(position)
        self.keys.append(key)
        self.pixels.append(pixels)
        self.views.append(view)

    def add_raw(self, position: int, key: str, data: bytes) -> None:
        self.raw.append((position, key, data))

    def fail(self, position: int, key: str, reason: str) -> None:
        self.failed.append((position, key, reason))

    def record(self) -> dict:
        pixels = _stack(self.pixels) if self.pixels else torch.empty(0, dtype=torch.uint8)
        raw = [(p, k, torch.frombuffer(bytearray(d), dtype=torch.uint8)) for p, k, d in self.raw]
        return {"part": self.part, "worker": self.worker, "positions": list(self.positions), "keys": self.keys,
                "pixels": pixels, "views": self.views, "raw": raw, "failed": self.failed, "end": None}

    def end(self, error: list | None, yielded: int, shard_failures: dict) -> dict:
        return {"part": self.part, "worker": self.worker, "positions": [], "keys": [],
                "pixels": torch.empty(0, dtype=torch.uint8), "views": [], "raw": [], "failed": [],
                "end": {"error": error, "yielded": yielded, "shard_failures": shard_failures}}


def _stack(pixels: list):
    """A record's pixels: one uint8 tensor, or a tuple of them when each sample has one view per preprocessing."""
    if isinstance(pixels[0], tuple):
        return tuple(torch.from_numpy(np.stack([p[i] for p in pixels])) for i in range(len(pixels[0])))
    return torch.from_numpy(np.stack(pixels))


def make_loader(block: ShardBlock, num_workers: int, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """The DataLoader over a block: records as the workers send them (no collation, no reordering)."""
    extra = {"prefetch_factor": max(1, prefetch), "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(block, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=_identity, **extra)


def _identity(record: dict) -> dict:
    return record


class PartFeed:
    """Hands the records of one part at a time to the caller, in the block's order.

    Records of a later part that arrive early (a faster worker) are held back (at most a few loader batches);
    records of a part skipped by the caller are dropped, so memory stays bounded by the loader's prefetch.
    """

    def __init__(self, loader: DataLoader, num_workers: int, order: list[int]):
        self._loader, self._records = loader, None  # workers start on the first record asked for
        self._workers = max(1, num_workers)
        self._order = {part: rank for rank, part in enumerate(order)}
        self._held: dict[int, deque] = {}
        self._done: set[int] = set()

    def _skip_before(self, part: int) -> None:
        """Parts before ``part`` in the block that nobody asked for (committed by another task meanwhile)."""
        for other, rank in self._order.items():
            if rank < self._order[part] and other not in self._done:
                self._done.add(other)
                self._held.pop(other, None)

    def records(self, part: int) -> Iterator[dict]:
        """Every record of ``part`` until each worker has sent its end-of-part record.

        A caller that stops early (an error) abandons the part: its later records are dropped.
        """
        self._skip_before(part)
        ended = 0
        try:
            while ended < self._workers:
                record = self._next(part)
                ended += record["end"] is not None
                yield record
        finally:
            self._done.add(part)
            self._held.pop(part, None)

    def _next(self, part: int) -> dict:
        held = self._held.get(part)
        if held:
            return held.popleft()
        if self._records is None:
            self._records = iter(self._loader)
        for record in self._records:
            if record["part"] == part:
                return record
            if record["part"] not in self._done:
                self._held.setdefault(record["part"], deque()).append(record)
        raise RuntimeError(f"the data loader ended before part {part} was complete")

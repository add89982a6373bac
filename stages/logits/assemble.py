"""Assembling one logits part from worker records: shard order, fixed compute batches, failures, the file.

Records arrive in any interleaving of workers. A window of shard positions ``[j*B, (j+1)*B)`` is run as one
compute batch as soon as every position in it is known (decoded or failed), so the rows, the batch
composition and hence the bytes depend only on the shard and the fingerprinted ``B``. Decode failures and
non-finite logits are counted by reason with their keys; they never become rows.

Multi-view logits (``params["views"]["aug"]`` set): row position ``p*V + v`` is view v of the sample at shard
position p, so windows are windows of rows. A failed image is counted once (its views 1..V-1 carry the
``SKIP`` placeholder), and an image with non-finite logits in any view loses all its rows (counted once),
so every image has exactly V rows or none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.errors import IntegrityError, PartFailed
from pipeline.progress import advance
from stages import imaging
from stages.artifacts.views import with_views
from stages.logits.data import SKIP, ShardRef
from stages.logits.inference import Engine, gpu_centre_views, views_of
from stages.logits.write import PartRows, part_table, write_part
from stages.shardio import ShardStats, read_shard
from stages.views.spec import AugSpec

log = logging.getLogger(__name__)
NONFINITE = "nonfinite_logits"
# Sample failures that a later run may overcome (decode policy or numerics); structural ones never change.
RETRYABLE = ("corrupt_image", "empty_image", "unsupported_mode", "too_many_pixels", "format_not_allowed",
             "missing_image", NONFINITE)


class _Window:
    """Decoded samples of one part by shard position, released one compute batch at a time."""

    def __init__(self, size: int):
        self.size, self.start, self.items = size, 0, {}

    def add(self, position: int, key: str, pixels=None, raw=None, reason: str | None = None, view=None) -> None:
        if position in self.items or position < self.start:
            raise IntegrityError(f"shard position {position} ({key}) arrived twice from the data loader")
        self.items[position] = (key, pixels, raw, reason, view)

    def full_batches(self) -> Iterable[list[tuple]]:
        while all(p in self.items for p in range(self.start, self.start + self.size)):
            yield self._take(self.start + self.size)

    def rest(self, total: int) -> Iterable[list[tuple]]:
        missing = [p for p in range(self.start, total) if p not in self.items]
        if missing or any(p >= total for p in self.items):
            raise IntegrityError(f"the data loader lost or invented shard positions (missing {missing[:5]})")
        while self.start < total:
            yield self._take(min(total, self.start + self.size))

    def _take(self, end: int) -> list[tuple]:
        batch = [self.items.pop(p) for p in range(self.start, end)]
        self.start = end
        return batch


def assemble_part(records: Iterable[dict], engine: Engine, params: dict, meta: dict, tmp: Path,
                  index: int) -> tuple[int, dict[str, list[str]]]:
    """Consume part ``index``'s records, run its compute batches, write the Parquet file to ``tmp``.

    Returns:
        (rows written, failures by reason with keys).

    Raises:
        PartFailed: the shard is truncated, unreadable or differs from the manifest.
    """
    window, rows, failures = _Window(engine.compute_batch), PartRows(), {}
    ends, done = [], _Done(params["views"]["count"])
    for record in records:
        _add_record(window, record)
        if record["end"] is not None:
            ends.append(record["end"])
        for batch in window.full_batches():
            _run_batch(batch, engine, rows, failures)
            done.add(len(batch))
    errors = [e["error"] for e in ends if e["error"]]
    if errors:
        raise PartFailed(errors[0][1], errors[0][0])
    for batch in window.rest(max(e["yielded"] for e in ends)):
        _run_batch(batch, engine, rows, failures)
        done.add(len(batch))
    for end in ends:
        for reason, keys in end["shard_failures"].items():
            failures.setdefault(reason, []).extend(keys)
    table = part_table(rows, index, num_classes=params["num_classes"], topk=params["topk"],
                       logit_dtype=params["logit_dtype"], embedding_dim=params["embedding_dim"], metadata=meta,
                       lse1=True)
    aug = params["views"]["aug"]
    if aug is not None:
        table = _drop_nonfinite_images(with_views(table, rows.views, AugSpec.from_dict(aug)), failures)
    write_part(table, tmp)
    return table.num_rows, failures


class _Done:
    """Reports images done to the task's live progress (``pipeline.progress``) as compute batches end."""

    def __init__(self, views: int):
        self.views, self.rows, self.images = max(1, int(views)), 0, 0

    def add(self, rows: int) -> None:
        self.rows += rows
        images = self.rows // self.views
        advance(images - self.images)
        self.images = images


def _drop_nonfinite_images(table, failures: dict):
    """Remove every row of an image one of whose views had non-finite logits (it is counted once)."""
    bad = failures.get(NONFINITE)
    if not bad:
        return table
    failures[NONFINITE] = list(dict.fromkeys(bad))
    return table.filter(pc.invert(pc.is_in(table.column("key"), value_set=pa.array(failures[NONFINITE]))))


def _add_record(window: _Window, record: dict) -> None:
    views = record.get("views") or [None] * len(record["keys"])
    for j, (position, key) in enumerate(zip(record["positions"], record["keys"])):
        pixels = record["pixels"]
        window.add(position, key, pixels=tuple(p[j] for p in pixels) if isinstance(pixels, tuple) else pixels[j],
                   view=views[j])
    for position, key, data in record["raw"]:
        window.add(position, key, raw=data)
    for position, key, reason in record["failed"]:
        window.add(position, key, reason=reason)


def _run_batch(batch: list[tuple], engine: Engine, rows: PartRows, failures: dict) -> None:
    """Run one compute batch (its good samples, in shard order) and append rows or failures."""
    good = []
    for key, pixels, raw, reason, view in _decode_raw(batch, engine):
        if reason == SKIP:
            continue  # another view of an image already counted as failed
        if reason is not None:
            failures.setdefault(reason, []).append(key)
        else:
            good.append((key, pixels, view))
    if not good:
        return
    out = engine.run(_stack([p for _, p, _ in good], engine.device))
    keys = [k for k, _, _ in good]
    bad = [keys[j] for j in np.flatnonzero(~out.finite)]
    if bad:
        failures.setdefault(NONFINITE, []).extend(bad)
        log.warning("%d sample(s) with non-finite logits (%s, ...); not written, counted as %s",
                    len(bad), bad[0], NONFINITE)
    keep = out.finite
    if good[0][2] is not None:  # multi-view: keep every row; whole images are dropped at the end
        keep = np.ones_like(keep)
    rows.append([k for k, ok in zip(keys, keep) if ok], out.index[keep], out.logit[keep], out.lse[keep],
                None if out.embedding is None else out.embedding[keep],
                views=[g[2] for g, ok in zip(good, keep) if ok], lse1=out.lse1[keep])


def _stack(views: list, device: torch.device):
    """One compute batch's pixels: a tensor, or per preprocessing a tensor (an ensemble's views are tuples)."""
    if isinstance(views[0], tuple):
        return tuple(_stack([v[i] for v in views], device) for i in range(len(views[0])))
    on_host = all(v.device.type == "cpu" for v in views)
    return torch.stack(views if on_host else [v.to(device) for v in views])


def _decode_raw(batch: list[tuple], engine: Engine) -> list[tuple]:
    """Decode the batch's raw JPEGs on the GPU (CPU policy decode for what the GPU refuses)."""
    raw = [(i, item[0], item[2]) for i, item in enumerate(batch) if item[2] is not None]
    if not raw:
        return batch
    batch = list(batch)
    for i, key, view in gpu_centre_views(raw, engine.pp, engine.device):
        if view is None:
            try:
                view = torch.from_numpy(np.array(imaging.centre_view(bytes(batch[i][2].numpy()), engine.pp)))
            except imaging.SampleError as exc:
                batch[i] = (key, None, None, exc.reason, None)
                continue
        batch[i] = (key, view, None, None, None)
    return batch


def recoverable_keys(ref: ShardRef, receipt: dict, pp: imaging.Preprocess, engine: Engine) -> list[str]:
    """Keys a committed part's receipt names as retryable failures that now decode to finite logits."""
    wanted = {k for reason in RETRYABLE for k in receipt.get("failures", {}).get(reason, [])}
    if not wanted:
        return []
    recovered = []
    try:
        for key, fields in read_shard(ref.path, ShardStats(ref.path), ref.sha256, ref.samples):
            if key in wanted and _succeeds(fields, pp, engine):
                recovered.append(key)
    except PartFailed as exc:
        log.warning("%s: cannot re-check failed samples: %s", ref.path, exc)
        return []
    return recovered


def _succeeds(fields: dict, pp: imaging.Preprocess, engine: Engine) -> bool:
    try:
        views = views_of(imaging.find_image(fields), engine)
    except imaging.SampleError:
        return False
    return bool(engine.run(views).finite[0])

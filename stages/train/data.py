"""The training data stream: WebDataset pipelines over the shards of dataset manifests.

Per epoch e, rank r and logical worker stream l (of W = max(1, num_workers)): the shard list is shuffled
with a seed of (seed, e), identical on every rank, then split by node (``[r::world]``) and by worker
(``[l::W]``), the rule of ``webdataset.split_by_node`` / ``split_by_worker``, with rank and stream passed
explicitly so that a resumed epoch can hand stream l to another physical worker. Each shard is read by
``stages.shardio.read_shard`` (sha256 and sample count checked as the bytes flow), samples go through
webdataset's shuffle buffer (a seeded ``random.Random``), are decoded explicitly through ``stages.imaging``
(never webdataset's decoders, which unpickle), get an explicit view (``augment.py``) and are batched. A
sample that cannot be used is skipped and reported with its batch as (reason, key): never fatal, no sleeps.
Every rank yields exactly ``steps_per_epoch`` batches per epoch (``DataPipeline.with_epoch``); a stream
that runs out of shards starts another pass over them, reshuffled.

Multi-view soft targets (reshard output of multi-view logits, docs/views.md): a sample whose ``json`` has
``"views"`` is rendered as its stored view ``views.epoch_view(seed, key, epoch, V)``, exactly (the teacher's
preprocessing, ``DataPlan.view_preprocess``; mixup partner from member ``p<v>.<ext>``), without the
student's own random view, and trains against that view's targets.

Resume is exact: a batch carries its stream's position (samples taken from the shuffle buffer so far); a
resumed stream skips that many samples without decoding them.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.storage import classify, sha256_of, size_of
from stages import imaging
from stages.artifacts.logits_reader import open_logits
from stages.imaging import Preprocess, SampleError
from stages.shardio import ShardStats, parse_label, read_shard, with_cls
from stages.train.augment import AugmentSpec, draw_view, eval_view, view_rng
from stages.views.render import View, epoch_view, render_view

log = logging.getLogger(__name__)
SOFT_FIELDS = ("topk_index", "topk_logit", "lse", "temperature")


@dataclass(frozen=True)
class ShardRef:
    """One shard of a training manifest, and where its stored teacher logits are (if joined by key)."""

    path: str
    sha256: str
    bytes: int
    samples: int
    shard_index: int
    logits: str | None = None
    label_from: str | None = None  # "json:FIELD" for an indexed pool labeled in its json members
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataPlan:
    """Everything a worker needs to build its stream (pickled into DataLoader workers)."""

    shards: tuple[ShardRef, ...]
    num_classes: int
    batch_size: int
    seed: int
    world: int
    streams: int
    preprocess: Preprocess
    augment: AugmentSpec | None
    need_label: bool
    need_soft: bool
    topk: int | None = None
    shuffle_buffer: int = 1000
    view_preprocess: Preprocess | None = None  # the teacher's, for stored views (multi-view soft targets)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank per epoch: samples // (world * batch), at least 1 (drop-last semantics)."""
        return max(1, self.total_samples // (self.world * self.batch_size))


def shards_for(num_shards: int, seed: int, epoch: int, rank: int, world: int, stream: int,
               streams: int) -> list[int]:
    """Shard indices of (rank, stream) in ``epoch``: one global shuffle, then ``[rank::world][stream::streams]``."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(num_shards).tolist()
    return order[rank::world][stream::streams]


def batches_of_stream(stream: int, streams: int, start: int, stop: int) -> int:
    """How many of the batches ``start..stop-1`` belong to ``stream`` (batch b is stream ``b % streams``)."""
    first = start + ((stream - start) % streams)
    return 0 if first >= stop else (stop - 1 - first) // streams + 1


def parse_soft(record: dict | None, num_classes: int, topk: int | None) -> tuple:
    """(topk_index, topk_logit, lse, temperature) checked for shape, range and finiteness."""
    if record is None:
        raise SampleError("missing_soft_targets", "no json soft targets and no joined teacher logits")
    try:
        index = np.asarray(record["topk_index"], dtype=np.int64)
        logit = np.asarray(record["topk_logit"], dtype=np.float32)
        lse, temp = float(record["lse"]), float(record["temperature"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleError("bad_soft_targets", f"soft targets unreadable ({exc})") from None
    if index.ndim != 1 or index.shape != logit.shape or (topk is not None and index.size != topk):
        raise SampleError("bad_soft_targets", f"top-K shapes {index.shape}/{logit.shape}, expected ({topk},)")
    if index.size and (index.min() < 0 or index.max() >= num_classes):
        raise SampleError("bad_soft_targets", f"class ids outside [0, {num_classes})")
    if not (np.isfinite(logit).all() and math.isfinite(lse) and temp > 0):
        raise SampleError("bad_soft_targets", "non-finite logits or lse, or temperature <= 0")
    return index, logit, lse, temp


def _json_record(fields: dict[str, bytes]) -> dict | None:
    if "json" not in fields:
        return None
    try:
        record = json.loads(fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SampleError("bad_soft_targets", "json member is not UTF-8 JSON") from None
    if not isinstance(record, dict):
        raise SampleError("bad_soft_targets", "json member is not an object")
    return record


def decode_sample(sample: dict, plan: DataPlan, epoch: int) -> dict:
    """Pixels (HWC uint8), label and soft targets of one raw sample; raises ``SampleError``."""
    key, fields = sample["__key__"], sample["fields"]
    img = imaging.decode(imaging.find_image(fields))
    record = None
    if plan.need_soft:
        record = sample["joined"] if sample["joined"] is not None else _json_record(fields)
    if record is not None and record.get("views") and plan.view_preprocess is not None:
        return _stored_view_sample(key, fields, img, record, plan, epoch)
    if plan.augment is not None:
        box, flip = draw_view(*img.size, view_rng(plan.seed, epoch, key, sample["pass"]), plan.augment)
    else:
        box, flip = eval_view(*img.size, plan.preprocess)
    out = {"key": key, "pixels": imaging.render(img, box, plan.preprocess, flip), "box": box, "flip": flip}
    out["label"] = parse_label(fields, plan.num_classes) if plan.need_label else _optional_label(fields, plan)
    if plan.need_soft:
        out["soft"] = parse_soft(record, plan.num_classes, plan.topk)
    return out


def _stored_view_sample(key: str, fields: dict, img, record: dict, plan: DataPlan, epoch: int) -> dict:
    """The sample as its stored view of this epoch: the teacher's exact pixels and that view's targets."""
    views = record["views"]
    try:
        rec = views[epoch_view(plan.seed, key, epoch, len(views))]
        view = View.from_json(rec)
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleError("bad_soft_targets", f"stored view unreadable ({exc})") from None
    partner = None
    if view.partner is not None:
        member = next((m for m in fields if m.startswith(f"p{view.index}.")), None)
        if member is None:
            raise SampleError("missing_partner", f"view {view.index} mixes in {view.partner!r}: no member "
                              f"p{view.index}.<ext>")
        partner = imaging.decode(fields[member])
    out = {"key": key, "pixels": render_view(img, view, plan.view_preprocess, partner), "box": view.box,
           "flip": view.flip}
    out["label"] = parse_label(fields, plan.num_classes) if plan.need_label else _optional_label(fields, plan)
    out["soft"] = parse_soft({**rec, "temperature": record.get("temperature")}, plan.num_classes, plan.topk)
    return out


def _optional_label(fields: dict[str, bytes], plan: DataPlan) -> int:
    try:
        return parse_label(fields, plan.num_classes)
    except SampleError:
        return -1


def collate(samples: list[dict], position: int, failures: list[tuple[str, str]]) -> dict:
    """A batch: NHWC uint8 images, int64 labels (-1 = none), stacked soft targets, views and bookkeeping."""
    batch = {"images": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
             "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
             "keys": [s["key"] for s in samples], "boxes": [s["box"] for s in samples],
             "flips": [s["flip"] for s in samples], "position": position, "failures": failures}
    if "soft" in samples[0]:
        index, logit, lse, temp = zip(*(s["soft"] for s in samples))
        batch["topk_index"] = torch.from_numpy(np.stack(index))
        batch["topk_logit"] = torch.from_numpy(np.stack(logit))
        batch["lse"] = torch.tensor(lse, dtype=torch.float32)
        batch["temperature"] = torch.tensor(temp, dtype=torch.float32)
    return batch


class Stream:
    """One (epoch, rank, stream) sample stream; its methods are the stages of a ``wds.DataPipeline``."""

    def __init__(self, plan: DataPlan, epoch: int, rank: int, stream: int, skip: int = 0):
        self.plan, self.epoch, self.rank, self.stream = plan, epoch, rank, stream
        self.skip, self.position, self.passes = skip, 0, 0
        self.failures: list[tuple[str, str]] = []
        self._logits: dict[str, object] = {}

    def shard_source(self) -> Iterator[dict]:
        """This stream's shards for the next pass (pass 0: the epoch's order; later passes reshuffled)."""
        p = self.plan
        order = shards_for(len(p.shards), p.seed, self.epoch, self.rank, p.world, self.stream, p.streams)
        if self.passes:
            rng = np.random.default_rng([p.seed, self.epoch, self.rank, self.stream, self.passes])
            order = [order[i] for i in rng.permutation(len(order))]
        self.passes += 1
        for index in order:
            yield {"shard": index, "pass": self.passes - 1}

    def read(self, source: Iterator[dict]) -> Iterator[dict]:
        """Raw samples of each shard via ``read_shard`` (checked against the manifest's sha256 and count)."""
        for item in source:
            ref = self.plan.shards[item["shard"]]
            joined = self._joined(ref)
            stats = ShardStats(ref.path)
            for key, fields in read_shard(ref.path, stats, ref.sha256, ref.samples):
                fields = with_cls(fields, ref.label_from, ref.class_names)
                yield {"__key__": key, "fields": fields, "pass": item["pass"],
                       "joined": None if joined is None else joined.get(key, None)}
                self._take_stats(stats)
            self._take_stats(stats)

    def _take_stats(self, stats: ShardStats) -> None:
        for reason, keys in stats.failures.items():
            self.failures.extend((reason, k) for k in keys)
        stats.failures.clear()

    def _joined(self, ref: ShardRef) -> dict | None:
        """Stored teacher targets of this shard by key (the logits part of the same index), or None."""
        if ref.logits is None:
            return None
        if ref.logits not in self._logits:
            self._logits[ref.logits] = open_logits(ref.logits)
        logits = self._logits[ref.logits]
        table = logits.read_part(ref.shard_index, columns=["key", "topk_index", "topk_logit", "lse"]).to_pylist()
        temp = logits.temperature
        return {row["key"]: {**row, "temperature": temp} for row in table}

    def skip_done(self, source: Iterator[dict]) -> Iterator[dict]:
        """Count samples leaving the shuffle buffer; drop (undecoded) those a resumed run already used."""
        for sample in source:
            self.position += 1
            if self.position > self.skip:
                yield sample

    def decode(self, source: Iterator[dict]) -> Iterator[dict]:
        """Decode and augment; a bad sample is recorded as (reason, key) and skipped."""
        for sample in source:
            try:
                yield decode_sample(sample, self.plan, self.epoch)
            except SampleError as exc:
                self.failures.append((exc.reason, sample["__key__"]))

    def batch(self, source: Iterator[dict]) -> Iterator[dict]:
        """Full batches only, emitted as soon as they fill (so ``position`` is exact)."""
        buffer: list[dict] = []
        for sample in source:
            buffer.append(sample)
            if len(buffer) == self.plan.batch_size:
                failures, self.failures = self.failures, []
                yield collate(buffer, self.position, failures)
                buffer = []

    def pipeline(self, nbatches: int) -> wds.DataPipeline:
        """The stream as a webdataset pipeline yielding ``nbatches`` batches."""
        rng = random.Random(f"shuffle-{self.plan.seed}-{self.epoch}-{self.rank}-{self.stream}")
        buffer = self.plan.shuffle_buffer
        stages = [self.shard_source, self.read]
        if buffer > 1:
            stages.append(wds.shuffle(buffer, initial=buffer, rng=rng))
        stages += [self.skip_done, self.decode, self.batch]
        return wds.DataPipeline(*stages).with_epoch(nbatches=nbatches)


class EpochBatches(torch.utils.data.IterableDataset):
    """The batches ``start..steps_per_epoch-1`` of one epoch on one rank, spread over DataLoader workers.

    Physical worker p serves logical stream ``(start + p) % streams`` so that the DataLoader's round robin
    yields batches in the same order as an uninterrupted epoch.
    """

    def __init__(self, plan: DataPlan, epoch: int, rank: int, start: int, positions: list[int]):
        super().__init__()
        self.plan, self.epoch, self.rank, self.start, self.positions = plan, epoch, rank, start, positions

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical = 0 if info is None else info.id
        streams = self.plan.streams
        stream = (self.start + physical) % streams
        count = batches_of_stream(stream, streams, self.start, self.plan.steps_per_epoch)
        if count == 0:
            return iter(())
        source = Stream(self.plan, self.epoch, self.rank, stream, self.positions[stream])
        return iter(source.pipeline(count))


def make_loader(plan: DataPlan, epoch: int, rank: int, start: int, positions: list[int],
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``EpochBatches`` with ``plan.streams`` workers (0 workers when streams == 1)."""
    workers = plan.streams if plan.streams > 1 else 0
    return torch.utils.data.DataLoader(EpochBatches(plan, epoch, rank, start, positions), batch_size=None,
                                       num_workers=workers, pin_memory=pin_memory,
                                       multiprocessing_context="fork" if workers else None)


def shard_refs(manifests: list[mf.Manifest], logits: list[str | None]) -> list[ShardRef]:
    """Every shard of the training manifests (local paths or URLs), with its teacher-logits path or None."""
    refs = []
    for manifest, logits_path in zip(manifests, logits):
        for index, entry in enumerate(manifest.files):
            where = manifest.file_path(entry)  # local or remote: read_shard streams and re-hashes either
            if "samples" not in entry:
                raise InputError(f"{manifest.path}: shard {entry['path']} has no sample count; re-ingest it")
            refs.append(ShardRef(str(where), entry["sha256"], int(entry["bytes"]), int(entry["samples"]), index,
                                 logits_path, manifest.params.get("label_from"),
                                 tuple(manifest.params.get("class_names") or ())))
    return refs


def check_shard_count(plan: DataPlan) -> None:
    """Refuse less than one batch per rank, or fewer shards than ranks x workers, saying what to change."""
    if plan.total_samples < plan.world * plan.batch_size:
        raise InputError(f"{plan.total_samples} training samples make no full batch of {plan.batch_size} per rank "
                         f"on {plan.world} rank(s): lower --batch-size to at most "
                         f"{max(1, plan.total_samples // plan.world)}")
    needed = plan.world * plan.streams
    if len(plan.shards) < needed:
        raise InputError(f"{len(plan.shards)} training shard(s) for {plan.world} rank(s) x {plan.streams} "
                         f"loader worker(s) = {needed} streams: lower --num-workers (or the number of "
                         f"ranks), or reshard into at least {needed} shards (smaller --shard-size)")


def _sha256(path: str) -> str:
    return sha256_of(path)[0] if classify(path).remote else sha256_file(path)


def verify_shards(refs: list[ShardRef], rank: int = 0, world: int = 1) -> list[str]:
    """Problems (size, sha256) of this rank's share ``refs[rank::world]`` of the shards; empty when intact.

    Every rank hashes a disjoint share before training, so the whole set is checked once, in parallel.
    """
    problems = []
    for ref in refs[rank::world]:
        try:
            size = size_of(ref.path)  # a local file, or an object in a bucket (a reshard written there)
            same = size == ref.bytes and _sha256(ref.path) == ref.sha256
        except OSError as exc:
            problems.append(f"{ref.path}: unreadable ({exc})")
            continue
        if size != ref.bytes:
            problems.append(f"{ref.path}: {size} bytes, the manifest says {ref.bytes}")
        elif not same:
            problems.append(f"{ref.path}: sha256 differs from the manifest (file changed or damaged)")
    return problems

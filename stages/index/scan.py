"""One streaming pass over an existing shard: what ``kdpipe index`` records of it.

The tar is read once, sequentially (``stages.shardio.read_shard``: webdataset's key rule, every byte hashed,
member bytes skipped unless a label needs them), so memory stays flat whatever the shard's size. Per shard:
bytes, sha256, samples (every key, as every later reader counts them), samples without an image member
(``no_image``: counted, not rows), the image extension(s) found, and label failures by key. Repeated keys, a
truncated tar and an unreadable shard fail the shard by name; img2dataset's ``NNNNN_stats.json``, when present
beside the tar, must agree (``successes`` = samples with an image).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from pipeline.errors import InputError, PartFailed
from pipeline.storage import open_read
from stages.imaging import IMAGE_EXTENSIONS, SampleError
from stages.shardio import ShardStats, UnsupportedTar, fast_members, parse_label, read_shard, tar_members, with_cls


@dataclass(frozen=True)
class Labels:
    """Where labels come from (``cls`` or ``json:FIELD``) and the class names."""

    source: str
    names: tuple[str, ...]

    @property
    def member(self) -> str:
        return "cls" if self.source == "cls" else "json"

    @classmethod
    def parse(cls, label_from: str | None, names: list[str] | None) -> "Labels | None":
        if label_from is None:
            if names:
                raise InputError("--classes without --label-from: say where labels are (cls or json:FIELD)")
            return None
        if label_from != "cls" and not (label_from.startswith("json:") and len(label_from) > 5):
            raise InputError(f"--label-from {label_from!r}: 'cls' or 'json:FIELD'")
        if not names:
            raise InputError(f"--label-from {label_from}: needs --classes FILE (class names, one a line)")
        return cls(label_from, tuple(names))

    def label_of(self, fields: dict[str, bytes | None]) -> tuple[int | None, str | None]:
        """(class id, None) or (None, failure reason) of one sample, exactly as training will read it."""
        try:
            return parse_label(with_cls(fields, self.source, self.names), len(self.names)), None
        except SampleError as exc:
            return None, exc.reason


def scan_shard(location: str, labels: Labels | None = None, check_stats: bool = True) -> dict:
    """The index record of one shard; ``PartFailed`` names what is wrong with it.

    A plain ``.tar`` is parsed by ``fast_members``; a compressed one, or one with a header it does not know,
    by ``tarfile`` (the same members either way; ``tests/test_index.py`` compares them)."""
    fast = location.lower().endswith(".tar")
    try:
        return _scan(location, labels, check_stats, fast_members if fast else tar_members)
    except UnsupportedTar:
        return _scan(location, labels, check_stats, tar_members)


def _scan(location: str, labels: Labels | None, check_stats: bool, members) -> dict:
    stats, exts, failures = ShardStats(location), Counter(), {}
    no_image, per_class = [], Counter()
    want = (lambda name: False) if labels is None else (lambda name: name.rsplit(".", 1)[-1].lower() == labels.member)
    for key, fields in read_shard(location, stats, want=want, members=members):
        ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
        if ext is None:
            no_image.append(key)
            continue
        exts[ext] += 1
        if labels is not None:
            label, reason = labels.label_of(fields)
            if reason:
                failures.setdefault(reason, []).append(key)
            else:
                per_class[label] += 1
    return _result(location, stats, exts, failures, no_image, per_class, labels, check_stats)


def _result(location, stats: ShardStats, exts: Counter, failures: dict, no_image: list, per_class: Counter,
            labels: Labels | None, check_stats: bool) -> dict:
    _refuse_repeats(location, stats)
    samples = stats.yielded + stats.failed
    images = stats.yielded - len(no_image)
    if check_stats:
        _check_stats(location, images)
    record = {"path": location, "external": True, "bytes": stats.nbytes, "sha256": stats.sha256,
              "samples": samples, "images": images, "no_image": len(no_image),
              "image_ext": ",".join(sorted(exts)) or None}
    failures.update(stats.failures)
    if no_image:
        failures["no_image"] = no_image
    return {"record": record, "failures": failures,
            "per_class": [per_class.get(i, 0) for i in range(len(labels.names))] if labels else None}


def _refuse_repeats(location: str, stats: ShardStats) -> None:
    repeated = stats.failures.get("duplicate_key")
    if repeated:
        raise PartFailed(f"{location}: key {repeated[0]!r} appears twice ({len(repeated)} repeated key(s)); "
                         "webdataset would yield two samples with one key. Rewrite the shard with unique keys",
                         "duplicate_key")


def stats_location(location: str) -> str:
    """img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar``."""
    return location[: -len(".tar")] + "_stats.json" if location.endswith(".tar") else location + "_stats.json"


def _check_stats(location: str, images: int) -> None:
    stats = _read_stats(stats_location(location))
    if stats is None or "successes" not in stats:
        return
    if int(stats["successes"]) != images:
        raise PartFailed(f"{location}: holds {images} samples with an image, but {stats_location(location)} says "
                         f"successes={stats['successes']} (count={stats.get('count')} is attempts, not samples); "
                         "the tar or its stats file is incomplete. Re-download the shard, or pass --no-check-stats",
                         "stats_mismatch")


def _read_stats(location: str) -> dict | None:
    """The stats file as a dict, or None when there is none (or it is not JSON: then it is not img2dataset's)."""
    try:
        with open_read(location) as handle:
            body = handle.read()
        data = json.loads(body)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

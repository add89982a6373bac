"""Reshard: write the selected samples as new WebDataset training shards with hard and soft targets.

Each training sample holds the original image member (original extension and bytes), ``cls`` (the
pseudo-label, ascii) and ``json`` (score, provenance, the teacher's top-K logits + lse + temperature, and
the class count ``num_classes``), so training needs no look-ups. Beside the manifest, timm's ``_info.json``
(``artifacts.sidecars``) lists the shards and their sample counts for ``timm`` ``wds/`` datasets. Output shard j reads a contiguous run of source shards once, sequentially
(``reshard_plan.plan_output_shards``); array tasks take blocks of output shards; within a shard samples
are shuffled with a seed. Every selected row lands exactly once or is a counted failure with its key
(``missing_key``, ``missing_image``, ``not_an_image``, decode reasons, ``missing_soft_targets``,
``missing_partner``).

``keep`` (``--keep txt,json``) carries other members of each selected sample through unchanged (captions,
img2dataset metadata): ``txt`` stays ``txt``; a name reshard writes itself (``cls``, ``json``, image
extensions) becomes ``src.<ext>`` (``src.json``). A sample without a kept member simply lacks it.

From multi-view logits (docs/views.md) a sample's ``json`` also carries ``"views"``: every stored view's
parameters and top-K targets, and each mixup partner's original image travels as member ``p<v>.<ext>``
(view v's partner), so the trainer can rebuild every view exactly without the source dataset.
"""

from __future__ import annotations

import itertools
import logging
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline import manifest as mf
from pipeline.errors import InputError, IntegrityError, ManifestError
from pipeline.objstore import ObjectPartStore, finalize_remote, is_remote_out
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.planning import plan_block
from pipeline.progress import advance
from pipeline.tasks import TaskReport, failure_totals, file_entries, finalize, run_parts, task_info
from stages.artifacts.lineage import Lineage, resolve_lineage
from stages.artifacts.selection import TARGET_COLUMNS, SelectionRows
from stages.artifacts.sidecars import sidecars_for, with_sidecars
from stages.artifacts.views import view_record, views_from_table
from stages.imaging import IMAGE_EXTENSIONS, SampleError, decode, sniff_extension
from stages.reshard.options import ReshardOptions
from stages.reshard.plan import plan_output_shards, plan_waves, sample_key, shuffle_order, targets_json
from stages.shardio import ShardStats, count_samples, read_shard, write_shard

log = logging.getLogger(__name__)
CODE_VERSION = "reshard-2"  # 2: json carries num_classes
HEADER_BYTES = 1024  # tar header + padding of the added json member, per sample (size estimate only)
SPOOL_MEMORY = 64 << 20


@dataclass
class ReshardResult:
    """The manifest (None until every part is committed) and what this task did."""

    manifest: Path | None
    report: TaskReport


@dataclass(frozen=True)
class _Plan:
    parts: list[range]
    part_rows: list[int]


def plan_for(lineage: Lineage, rows: SelectionRows, shard_size: int, shard_bytes: int) -> _Plan:
    """Count selected rows per source shard, estimate their bytes, and plan the output shards."""
    files = lineage.dataset.files
    counts = rows.shard_counts(len(files), int(lineage.selection.params["num_classes"]))
    sizes = [int(c) * (f["bytes"] / max(f["samples"], 1) + HEADER_BYTES) for c, f in zip(counts, files)]
    parts = plan_output_shards([int(c) for c in counts], sizes, shard_size, shard_bytes)
    if not parts:
        raise InputError(f"{lineage.selection.path}: the selection has no rows; nothing to reshard")
    return _Plan(parts, [int(counts[r.start:r.stop].sum()) for r in parts])


class _WaveCache:
    """Rows of the parts of the current wave, read from the selection in one scan per wave."""

    def __init__(self, rows: SelectionRows, plan: _Plan, waves: list[list[int]]):
        self.rows, self.plan = rows, plan
        self.wave_of = {part: i for i, wave in enumerate(waves) for part in wave}
        self.waves, self.loaded, self.table = waves, None, None

    def part_rows(self, part: int) -> list[dict]:
        """The part's selected rows, sorted by (shard, key, label, dup): independent of the selection order."""
        wave = self.wave_of[part]
        if wave != self.loaded:
            first, last = self.plan.parts[self.waves[wave][0]], self.plan.parts[self.waves[wave][-1]]
            self.table, self.loaded = self.rows.rows_in(first.start, last.stop), wave
        span = self.plan.parts[part]
        shard = self.table.column("shard").to_numpy(zero_copy_only=False)
        mine = self.table.filter((shard >= span.start) & (shard < span.stop))
        order = [("shard", "ascending"), ("key", "ascending"), ("label", "ascending"), ("dup", "ascending")]
        return mine.sort_by(order).to_pylist()


class _PartWriter:
    """Writes one output shard: read its source shards once, spool the selected images, shuffle, write."""

    def __init__(self, lineage: Lineage, cache: _WaveCache, seed: int, decode_check: bool, temperature: float,
                 scratch: Path, keep: tuple[str, ...] = ()):
        self.lineage, self.cache, self.seed, self.keep = lineage, cache, seed, keep
        self.decode_check, self.temperature, self.scratch = decode_check, temperature, scratch
        self.num_classes = int(lineage.selection.params["num_classes"])
        self.multiview = multiview_of(lineage) > 1

    def __call__(self, part: int) -> Callable[[Path], PartResult]:
        rows = self.cache.part_rows(part)

        def write(tmp: Path) -> PartResult:
            failures: dict[str, list[str]] = {}
            with tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=self.scratch) as spool:
                samples = self._samples(rows, spool, failures)
                order = shuffle_order(len(samples), self.seed, part)
                write_shard(tmp, (_materialise(samples[i], spool) for i in order))
            shards = sorted({r["shard"] for r in rows})
            return PartResult(expected_rows=len(samples), failures=failures,
                              input={"source_shards": shards, "selected_rows": len(rows)},
                              extra={"failed_labels": _failed_labels(rows, samples)})
        return write

    def _samples(self, rows: list[dict], spool, failures: dict[str, list[str]]) -> list[tuple]:
        samples, seen = [], set()
        for shard, members in itertools.groupby(rows, key=lambda r: r["shard"]):  # rows are sorted by shard
            group = list(members)
            views = self._views(shard, group) if self.multiview else {}
            partners = {v["partner"] for rows in views.values() for v in rows if v["partner"] is not None}
            images = self._spool_shard(shard, {r["key"] for r in group} | partners, spool)
            targets = self._targets(shard, group)
            advance(len(group))  # the task's live progress: this source shard's selected rows
            for row in group:
                out_key = sample_key(row["key"], row["label"], row["dup"])
                reason = _row_problem(row["key"], out_key, images, targets, seen)
                members = [] if reason else _partner_members(views.get(row["key"]), images)
                reason = reason or (None if members is not None else "missing_partner")
                if reason:
                    failures.setdefault(reason, []).append(out_key)
                    continue
                seen.add(out_key)
                ext, offset, size, kept = images[row["key"]]
                members = members + kept
                body = targets_json({**row, **targets[row["key"]]}, self.temperature, self.num_classes,
                                    views.get(row["key"]))
                samples.append((out_key, ext, offset, size, row["label"], body, members))
        return samples

    def _views(self, shard: int, group: list[dict]) -> dict[str, list[dict]]:
        """Every stored view (parameters and targets) of the group's keys, from the shard's logits part."""
        needed = {r["key"] for r in group}
        table = self.lineage.logits.read_part(shard)
        keep = [i for i, k in enumerate(table.column("key").to_pylist()) if k in needed]
        table = table.take(keep)
        out: dict[str, list[dict]] = {}
        for key, view, row in zip(table.column("key").to_pylist(), views_from_table(table),
                                  table.select(list(TARGET_COLUMNS)).to_pylist()):
            out.setdefault(key, []).append(view_record(view, row["topk_index"], row["topk_logit"], row["lse"]))
        return out

    def _spool_shard(self, shard: int, needed: set[str], spool) -> dict[str, tuple | str]:
        """Read source shard ``shard`` once; spool the needed images; a bad one maps to its failure reason."""
        entry = self.lineage.dataset.files[shard]
        path = self.lineage.dataset.file_path(entry)
        stats, found = ShardStats(str(path)), {}
        for key, fields in read_shard(path, stats, entry["sha256"], entry["samples"]):
            if key in needed:
                found[key] = self._spool_image(fields, spool)
        return found

    def _spool_image(self, fields: dict[str, bytes], spool) -> tuple | str:
        ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
        if ext is None:
            return "missing_image"
        data = fields[ext]
        if self.decode_check:
            try:
                decode(data)
            except SampleError as exc:
                return exc.reason
        elif sniff_extension(data) is None:
            return "not_an_image"
        spool.seek(0, 2)
        offset = spool.tell()
        spool.write(data)
        return (ext, offset, len(data), self._spool_kept(fields, spool))

    def _spool_kept(self, fields: dict[str, bytes], spool) -> list[tuple]:
        """``(member, offset, size)`` of each ``--keep`` member the sample has (renamed on a collision)."""
        kept = []
        for ext in self.keep:
            if ext in fields:
                spool.seek(0, 2)
                kept.append((kept_name(ext), spool.tell(), len(fields[ext])))
                spool.write(fields[ext])
        return kept

    def _targets(self, shard: int, group: list[dict]) -> dict[str, dict]:
        """Soft targets by key: from the selection's columns, else from the logits part of this shard."""
        if all(row.get("lse") is not None for row in group):
            return {r["key"]: {c: r[c] for c in TARGET_COLUMNS} for r in group}
        needed = {r["key"] for r in group}
        if self.lineage.logits is None:
            raise ManifestError(f"{self.lineage.selection.path}: rows of shard {shard} lack soft targets and the "
                                "logits they came from cannot be found; restore its lineage path")
        table = self.lineage.logits.read_part(shard, columns=["key", *TARGET_COLUMNS])
        return {r["key"]: r for r in table.to_pylist() if r["key"] in needed}


def _row_problem(key: str, out_key: str, images: dict, targets: dict, seen: set) -> str | None:
    """The failure reason of one selected row, or None when it becomes a sample."""
    if out_key in seen:
        return "duplicate_row"
    found = images.get(key)
    if found is None:
        return "missing_key"
    if isinstance(found, str):
        return found
    return None if key in targets else "missing_soft_targets"


def _partner_members(views: list[dict] | None, images: dict) -> list[tuple] | None:
    """``(member, offset, size)`` of each view's mixup partner (``p<v>.<ext>``); None if one is missing."""
    members = []
    for record in views or []:
        found = images.get(record["partner"]) if record["partner"] is not None else ()
        if not isinstance(found, tuple):
            return None
        if found:
            ext, offset, size = found[:3]
            members.append((f"p{record['view']}.{ext}", offset, size))
    return members


OWN_MEMBERS = ("cls", "json", *IMAGE_EXTENSIONS)


def parse_keep(text: str) -> tuple[str, ...]:
    """``txt,json`` -> ("txt", "json"); ``InputError`` for a name that is not a member extension."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    bad = [n for n in names if not re.fullmatch(r"[a-z0-9_][a-z0-9_.-]*", n) or n.startswith("p") and n[1:2].isdigit()]
    if bad:
        raise InputError(f"--keep {text!r}: {bad[0]!r} is not a member extension (e.g. txt,json)")
    return names


def kept_name(ext: str) -> str:
    return f"src.{ext}" if ext in OWN_MEMBERS else ext


def _materialise(sample: tuple, spool) -> dict:
    out_key, ext, offset, size, label, body, members = sample
    spool.seek(offset)
    out = {"__key__": out_key, ext: spool.read(size), "cls": str(label).encode(), "json": body}
    for name, start, length in members:
        spool.seek(start)
        out[name] = spool.read(length)
    return out


def multiview_of(lineage: Lineage) -> int:
    """Stored views per image of the selection's logits (1 when single-view or not found)."""
    return 1 if lineage.logits is None else int(lineage.logits.views.get("count", 1))


def reshard(selection: str | Path, out: str | Path, *, data: str | Path | None = ReshardOptions.data,
            shard_size: int = ReshardOptions.shard_size, shard_bytes: int = ReshardOptions.shard_bytes,
            seed: int = ReshardOptions.seed, decode_check: bool = ReshardOptions.decode_check,
            max_rows: int = ReshardOptions.max_rows, keep: str = ReshardOptions.keep, task_index: int = 0,
            num_tasks: int = 1, retry_failed: bool = False, max_attempts: int = 3,
            do_finalize: bool = True, finalize_only: bool = False) -> ReshardResult:
    """Write the selection's samples as training shards in ``out``; finalize when every part is committed.

    Args:
        selection: the selection manifest.
        out: output folder (parts, receipts, manifest).
        data: the source dataset manifest; default: found through the logits' lineage.
        shard_size: samples per output shard, about (never more, unless one source shard alone has more).
        shard_bytes: bytes per output shard, about.
        seed: seed of the within-shard shuffle.
        decode_check: fully decode each selected image (default: check its signature only).
        max_rows: selection rows held in memory at once (a task reads the selection once per this many rows).
        keep: other members to carry through, comma-separated (``txt,json``).
        task_index: this array task; it writes its ``plan_block`` of output shards.
        num_tasks: number of array tasks.
        retry_failed: retry parts that failed ``max_attempts`` times.
        max_attempts: give up on a part after this many failed attempts.
        do_finalize: write the manifest when every part is committed.
        finalize_only: write no part, only the manifest (``ManifestError`` naming the parts still missing).
    """
    if shard_size < 1 or shard_bytes < 1:
        raise InputError(f"--shard-size and --shard-bytes must be >= 1 (got {shard_size}, {shard_bytes})")
    rows = SelectionRows(mf.load(selection, kind="selection"))
    lineage = resolve_lineage(rows.manifest, data, need_logits=not rows.has_targets)
    plan = plan_for(lineage, rows, shard_size, shard_bytes)
    kept = parse_keep(keep)
    params = _fingerprint_params(lineage, shard_size, shard_bytes, seed, decode_check)
    if kept:  # absent when empty: folders made before --keep existed keep their fingerprint
        params["keep"] = list(kept)
    out = out if is_remote_out(out) else Path(out)
    kind = ObjectPartStore if is_remote_out(out) else PartStore  # a prefix in object storage: pipeline.objstore
    store = kind(out, ".tar", fingerprint("reshard", params, CODE_VERSION), count_samples)
    block = [] if finalize_only else list(plan_block(task_index, num_tasks, len(plan.parts)))
    cache = _WaveCache(rows, plan, plan_waves(plan.part_rows, block, max_rows))
    scratch = store.scratch if isinstance(store, ObjectPartStore) else out
    writer = _PartWriter(lineage, cache, seed, decode_check, _soft_targets(lineage)["temperature"], scratch, kept)
    produce = lambda index: store.commit(index, writer(index), task_info(task_index, num_tasks))
    report = run_parts(store, block, produce, max_attempts=max_attempts, retry_failed=retry_failed, desc="reshard",
                       num_parts=len(plan.parts), part_samples=lambda index: plan.part_rows[index])
    done = finalize_only or (do_finalize and all(store.committed(i, verify=False) is not None
                                                 for i in range(len(plan.parts))))
    manifest = _finalize(store, lineage, rows, plan, params, out) if done else None
    return ReshardResult(manifest, report)


def _fingerprint_params(lineage: Lineage, shard_size: int, shard_bytes: int, seed: int, decode_check: bool) -> dict:
    return {"selection_id": lineage.selection.id, "dataset_id": lineage.dataset.id, "shard_size": shard_size,
            "shard_bytes": shard_bytes, "seed": seed, "decode_check": decode_check}


def _soft_targets(lineage: Lineage) -> dict:
    """``soft_targets`` params: from the selection's params, else from its logits."""
    sel, logits = lineage.selection.params, lineage.logits
    pick = lambda key, attr: sel.get(key) if sel.get(key) is not None else getattr(logits, attr, None)
    out = {"topk": pick("topk", "topk"), "temperature": pick("temperature", "temperature"),
           "teacher_id": pick("teacher_id", "teacher_id"), "logits_id": sel["logits_id"]}
    if multiview_of(lineage) > 1:  # the trainer renders the stored views with the teacher's preprocessing
        out["views"] = dict(logits.views)
        out["preprocess"] = dict(logits.params["preprocess"])
    return out


def _finalize(store: PartStore, lineage: Lineage, rows: SelectionRows, plan: _Plan, params: dict,
              out: Path) -> Path:
    names = list(lineage.selection.params["class_names"])
    manifest_params = {**params, "labeled": True, "class_names": names, "num_classes": len(names),
                       "source": "reshard", "split": None, "soft_targets": _soft_targets(lineage)}
    inputs = [mf.input_ref(lineage.selection, out, "selection"), mf.input_ref(lineage.dataset, out, "data")]

    def build(receipts: list[dict]) -> dict:
        samples, failures = sum(r["rows"] for r in receipts), failure_totals(receipts)
        expected = sum(plan.part_rows)
        if samples + sum(failures.values()) != expected:
            raise IntegrityError(f"{out}: {samples} samples + {sum(failures.values())} failures != {expected} "
                                 "selected rows; delete the folder and rerun")
        per_class = _per_class(receipts, rows, len(names))
        totals = {"samples": samples, "failures": failures, "classes": len(names), "selection_rows": expected,
                  "per_class": per_class}
        return mf.build("dataset", stage="reshard", params=manifest_params, inputs=inputs,
                        files=file_entries(receipts, "samples"), totals=totals)
    if isinstance(store, ObjectPartStore):
        return finalize_remote(store, len(plan.parts), build, sidecars_for)
    return finalize(store, len(plan.parts), with_sidecars(out, build))


def _failed_labels(rows: list[dict], samples: list[tuple]) -> dict[str, int]:
    """Selected rows that did not become samples, per label, sparse: a receipt never holds a per-class list."""
    lost = Counter(int(r["label"]) for r in rows) - Counter(int(s[4]) for s in samples)
    return {str(label): count for label, count in sorted(lost.items())}


def _per_class(receipts: list[dict], rows: SelectionRows, num_classes: int) -> list[int]:
    """Samples per class: the selection's rows per label minus the failed ones (receipts of older kdpipes
    carried a dense ``per_class``)."""
    if all("per_class" in r["extra"] for r in receipts):
        return np.sum([r["extra"]["per_class"] for r in receipts], axis=0).tolist()
    counts = rows.label_counts(num_classes)
    for receipt in receipts:
        for label, count in receipt["extra"].get("failed_labels", {}).items():
            counts[int(label)] -= count
    return counts.tolist()


def iter_training_samples(manifest: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of a resharded dataset, shard by shard, checked against its manifest (for tests, tools)."""
    data = mf.load(manifest, kind="dataset")
    for entry in data.files:
        path = data.file_path(entry)
        yield from read_shard(path, ShardStats(str(path)), entry["sha256"], entry["samples"])

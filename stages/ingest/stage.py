"""Ingest: a source (folder, file list, bundled digits) -> WebDataset tar shards + a dataset manifest.

Shards roll over by count and by bytes (planned up front by ``plan_shards``, a pure function, so every
shard is a restartable part). ``--split`` carves deterministic, stratified subsets (e.g. a small labeled
set, an unlabeled pool whose labels are hidden, a test set), each its own dataset in ``OUT/<split>/``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.atomic import write_atomic
from pipeline.errors import InputError
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.planning import plan_block
from pipeline.progress import advance
from pipeline.tasks import TaskReport, failure_totals, file_entries, finalize, run_parts, task_info
from stages.imaging import sniff_extension
from stages.ingest.drift import check_drift, listing_row, write_listing
from stages.ingest.options import IngestOptions
from stages.ingest.sources import Item, Source, discover
from stages.shardio import count_samples, write_shard

log = logging.getLogger(__name__)
CODE_VERSION = "ingest-1"
HIDDEN = "_hidden"


@dataclass(frozen=True)
class SplitRule:
    """One ``name=amount`` of a split spec: amount is a count, a fraction, ``N/class`` or ``rest``.

    ``N/class`` draws N per class at random (seeded); ``N/class:first`` takes the first N of each class in
    source order (a fixed labeled subset that no seed changes)."""

    name: str
    count: int | None = None
    fraction: float | None = None
    per_class: int | None = None
    first: bool = False


def parse_split(spec: str) -> list[SplitRule]:
    """Parse ``labeled=3/class,test=500,unlabeled=rest``; raise ``InputError`` naming the bad item."""
    rules = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        match = re.fullmatch(r"([A-Za-z0-9_-]+)=(rest|\d+/class(?::first|:seeded)?|\d+|0?\.\d+)", item)
        if not match:
            raise InputError(f"--split item {item!r}: expected name=N, name=0.F, name=N/class, "
                             "name=N/class:first or name=rest")
        name, amount = match.groups()
        if amount == "rest":
            rules.append(SplitRule(name))
        elif "/class" in amount:
            rules.append(SplitRule(name, per_class=int(amount.split("/")[0]), first=amount.endswith(":first")))
        elif "." in amount:
            rules.append(SplitRule(name, fraction=float(amount)))
        else:
            rules.append(SplitRule(name, count=int(amount)))
    if len({r.name for r in rules}) != len(rules):
        raise InputError(f"--split {spec!r} names a split twice")
    return rules


def assign_splits(labels: list[int | None], rules: list[SplitRule], seed: int) -> dict[str, list[int]]:
    """Deterministic stratified assignment of item indices to splits (each list sorted)."""
    rng = np.random.default_rng(seed)
    taken: dict[str, list[int]] = {r.name: [] for r in rules}
    pool = list(range(len(labels)))
    for rule in (r for r in rules if r.per_class is not None):
        if any(lab is None for lab in labels):
            raise InputError(f"--split {rule.name}={rule.per_class}/class needs a labeled source")
        for label in sorted({lab for lab in labels}):
            members = [i for i in pool if labels[i] == label]
            if rule.first:  # source order: the pool is sorted by item index
                taken[rule.name] += members[: rule.per_class]
            else:
                taken[rule.name] += [members[j] for j in rng.permutation(len(members))[: rule.per_class]]
        pool = sorted(set(pool) - set(taken[rule.name]))
    pool = [pool[j] for j in rng.permutation(len(pool))]
    total = len(labels)
    for rule in (r for r in rules if r.per_class is None):
        amount = len(pool) if rule.count is None and rule.fraction is None else (
            rule.count if rule.count is not None else int(round(rule.fraction * total)))
        taken[rule.name], pool = pool[:amount], pool[amount:]
    return {name: sorted(indices) for name, indices in taken.items()}


def plan_shards(sizes: list[int], max_count: int, max_bytes: int) -> list[range]:
    """Group consecutive items into shards of at most ``max_count`` items and about ``max_bytes`` bytes."""
    shards, start, used = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_count or used + size > max_bytes):
            shards.append(range(start, index))
            start, used = index, 0
        used += size
    if start < len(sizes):
        shards.append(range(start, len(sizes)))
    return shards


def _read(item: Item) -> tuple[bytes | None, str | None]:
    """An item's bytes, or None and the reason it could not be read."""
    try:
        return item.read(), None
    except OSError as exc:
        return None, f"unreadable_file: {exc}"


def _to_sample(item: Item, data: bytes) -> dict:
    """An item's bytes as a webdataset sample; raise ``InputError`` with its reason for a bad file."""
    ext = sniff_extension(data)
    if ext is None:
        raise InputError("not_an_image: the bytes are not JPEG, PNG, GIF, BMP or WEBP")
    sample = {"__key__": item.key, ext: data}
    if item.label is not None:
        sample["cls"] = str(item.label).encode()
    return sample


def _write_part(items: list[Item], out_dir: Path | None = None, index: int | None = None):
    """Writer of one shard; with ``out_dir`` and ``index`` it also publishes the part's source listing
    (``stages.ingest.drift``), which the receipt's input names with its sha256."""
    def write(tmp: Path) -> PartResult:
        failures: dict[str, list[str]] = {}
        samples, rows = [], []
        for item in items:
            data, error = _read(item)
            rows.append(listing_row(item, data))
            try:
                if error is not None:
                    raise InputError(error)
                samples.append(_to_sample(item, data))
            except InputError as exc:
                reason = str(exc).split(":", 1)[0]
                failures.setdefault(reason, []).append(item.origin)
                log.warning("skipped %s: %s", item.origin, exc)
            advance(1)  # the task's live progress
        write_shard(tmp, iter(samples))
        listing = write_listing(out_dir, index, rows) if out_dir is not None else {}
        return PartResult(expected_rows=len(samples), failures=failures,
                          input={"items": len(items), "first": items[0].origin if items else None, **listing})
    return write


def ingest(src: str, out: Path, *, shard_size: int = IngestOptions.shard_size,
           shard_bytes: int = IngestOptions.shard_bytes, split: str | None = IngestOptions.split,
           seed: int = IngestOptions.seed, task_index: int = 0, num_tasks: int = 1,
           do_finalize: bool = True) -> dict[str, Path | None]:
    """Ingest ``src`` into ``out`` (or ``out/<split>/`` per split). Returns each dataset's manifest path.

    Args:
        src: folder of class subfolders, flat folder, file list, or ``digits``.
        out: output folder.
        shard_size: samples per shard at most.
        shard_bytes: bytes per shard, about (a shard rolls over before it would exceed it).
        split: split spec such as ``labeled=3/class,test=500,unlabeled=rest``; ``unlabeled`` hides labels.
        seed: seed of the split.
        task_index: this array task.
        num_tasks: array size; each task writes its block of shards of each split.
        do_finalize: write manifests when all parts are committed.
    """
    source = discover(src)
    if not source.items:
        raise InputError(f"{src}: no files found")
    groups = {None: list(range(len(source.items)))}
    if split:
        groups = assign_splits([i.label for i in source.items], parse_split(split), seed)
    out = Path(out)
    results = {}
    for name, indices in groups.items():
        items = [source.items[i] for i in indices]
        hide = name == "unlabeled"
        folder = out / name if name else out
        params = {"source": src, "shard_size": shard_size, "shard_bytes": shard_bytes, "split": name,
                  "split_spec": split, "seed": seed, "labels_hidden": hide}
        if hide and source.labeled:  # before the split's manifest: a manifest never precedes what it promises
            _write_hidden_labels(out / HIDDEN / f"{name}-labels.parquet", items)
        results[name or "all"] = _ingest_group(source, items, folder, params, hide, task_index, num_tasks,
                                               do_finalize)
    return results


def _ingest_group(source: Source, items: list[Item], folder: Path, params: dict, hide: bool,
                  task_index: int, num_tasks: int, do_finalize: bool) -> Path | None:
    if hide:
        items = [replace(i, label=None) for i in items]
    shards = plan_shards([i.size for i in items], params["shard_size"], params["shard_bytes"])
    store = PartStore(folder, ".tar", fingerprint("ingest", params, CODE_VERSION), count_samples)
    produce = lambda index: store.commit(index, _write_part([items[j] for j in shards[index]], folder, index),
                                         task_info(task_index, num_tasks))
    block = list(plan_block(task_index, num_tasks, len(shards)))
    check_drift(store, items, shards, block, params["source"])  # a changed source is refused before any part
    report: TaskReport = run_parts(store, block, produce, desc="ingest", num_parts=len(shards),
                                   part_samples=lambda index: len(shards[index]))
    if report.exit_code:
        first = next(iter(report.failed.values()), "given up after repeated failures")
        raise InputError(f"{folder}: {len(report.failed) + len(report.given_up)} shard(s) failed, first: {first}; "
                         "see the log")
    if not do_finalize or any(store.committed(i, verify=False) is None for i in range(len(shards))):
        return None
    names = source.class_names if source.labeled and not hide else []
    manifest_params = {**params, "labeled": bool(names), "source_kind": source.kind,
                       "class_names": names, "num_classes": len(names)}
    def build(receipts: list[dict]) -> dict:
        samples, failures = sum(r["rows"] for r in receipts), failure_totals(receipts)
        if samples == 0:
            raise InputError(f"{params['source']}: not one of its {len(items)} file(s) is a readable image "
                             f"(failures: {failures}); a dataset of 0 samples is refused. Check the source")
        return mf.build("dataset", stage="ingest", params=manifest_params, files=file_entries(receipts, "samples"),
                        totals={"samples": samples, "failures": failures, "classes": len(names),
                                **skipped_totals(source)})
    return finalize(store, len(shards), build)


def skipped_totals(source: Source) -> dict:
    """``{"skipped": {reason: count}}`` for source entries never read (FIFO, socket, device, broken link);
    empty when there are none, so that manifests of ordinary sources are unchanged."""
    if not source.skipped:
        return {}
    for reason, paths in sorted(source.skipped.items()):
        log.warning("skipped %d source entr%s that %s not a regular file (%s): %s", len(paths),
                    "y" if len(paths) == 1 else "ies", "is" if len(paths) == 1 else "are", reason,
                    ", ".join(paths[:5]))
    return {"skipped": {reason: len(paths) for reason, paths in sorted(source.skipped.items())}}


def _write_hidden_labels(path: Path, items: list[Item]) -> None:
    """Labels of a split whose labels are hidden from every stage (for evaluation of pseudo-labels only)."""
    table = pa.table({"key": [i.key for i in items], "label": pa.array([i.label for i in items], pa.int32())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    body = sink.getvalue().to_pybytes()
    if not path.is_file() or path.read_bytes() != body:  # a rerun leaves an identical file untouched
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, body)

"""Select: exact per-class top-K pseudo-labels from a logits artifact, as array-task map + one reduce.

Map: task i of n ranks its block of logits parts (``plan_block``) by numbers alone (``ScoreTopK``), reads back the
survivors' payload (``fetch``) and commits its exact per-class candidates (top K_l within the block, ties by key:
``exact_rows``) as ``DIR/_map/tasks-<n>/part-<i>.parquet``.
Reduce: when every map part is committed (the last task to finish, or ``--finalize``), the map parts are
streamed through the same accumulator; the result, with ranks and balance copies, is committed as
``DIR/part-000000.parquet``; then the report (``DIR/report/``) and, last, the selection manifest are written.
Memory is O(classes x K) plus one read batch in both steps; the output is the same for any n.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import InputError, IntegrityError, ManifestError, PartFailed
from pipeline.memory import release_memory
from pipeline.objstore import ObjectPartStore, finalize_remote, is_remote_out
from pipeline.parts import PartResult, PartStore, fingerprint, part_name
from pipeline.planning import plan_block
from pipeline.progress import advance
from pipeline.storage import RemotePath
from pipeline.tasks import file_entries, finalize, run_parts, task_info
from pipeline.verify import parquet_rows
from stages.artifacts.arrays import to_numpy
from stages.artifacts.exclusion import Exclusion, load_exclusion
from stages.artifacts.logits_format import LSE1, read_metadata
from stages.artifacts.logits_reader import AGREEING, LogitsSet, open_logits
from stages.artifacts.parquet import open_parquet, source, write_parquet
from stages.artifacts.reports import preload
from stages.artifacts.selection import SCHEMA_VERSION
from stages.artifacts.sidecars import sidecars_for, with_sidecars
from stages.select.fetch import fetch_payload, numbered_batches, parallel_parts
from stages.select.options import SelectOptions
from stages.select.output import final_table, payload_columns
from stages.select.policy import Scorer, SelectSpec, excluded_rows, make_spec
from stages.select.policy import rank_temperature as rank_temperature_of
from stages.select.report import report_objects, write_report
from stages.select.topk import ClassTopK, ScoreTopK, exact_rows

log = logging.getLogger(__name__)
CODE_VERSION = "select-1"
MAP_DIR = "_map"
MAP_ROW_GROUP = 1 << 17  # rows per row group of a map part (bounds the writer's buffers)
CANDIDATES_META = b"kdpipe_candidates"  # a map part's candidates per class (file metadata, not the receipt)
ROW_ID = "_row"  # internal: (logits part << 32) + row, the identity of an image in map parts (fetch.ROW_BITS)
_TYPED = ("key", "shard", "topk_index", "topk_logit", "lse", LSE1)


def select(logits: str | Path, out: str | Path, *, per_class: str | int, policy: str = SelectOptions.policy,
           top_p: int | None = SelectOptions.top_p, min_score: float = SelectOptions.min_score,
           balance: bool = SelectOptions.balance, soft_targets: bool = SelectOptions.soft_targets,
           rank_temperature: float | None = SelectOptions.rank_temperature,
           exclude: str | Path | None = SelectOptions.exclude, task_index: int = 0, num_tasks: int = 1,
           finalize_only: bool = False, do_finalize: bool = True, batch_rows: int = SelectOptions.batch_rows,
           gallery: int = SelectOptions.gallery, dataset: str | Path | None = SelectOptions.dataset,
           retry_failed: bool = False, max_attempts: int = 3) -> Path | None:
    """Run one array task of ``kdpipe select``; reduce and finalize when all map parts exist.

    Args:
        logits: logits manifest (file or folder).
        out: output folder of the selection.
        per_class: K per class: an integer, or a CSV/JSON file (class -> K). Also the cap of ``threshold``.
        policy: ``topk`` (top-P membership, rank by p(l|x)) or ``threshold`` (argmax, min_score, cap).
        top_p: P of the ``topk`` policy (at most the stored top-K).
        min_score: the smallest score admitted (both policies).
        balance: ``threshold`` only: duplicate rows of classes under the cap to reach it (``dup`` > 0).
        soft_targets: carry ``topk_index``, ``topk_logit``, ``lse`` into the selection.
        rank_temperature: score and rank at T = 1 (``lse1``) instead of the stored T; soft targets stay at T.
        exclude: an exclusion manifest (from dedup); its keys are dropped before ranking.
        task_index: this map task; num_tasks: how many map tasks.
        finalize_only: only reduce and write the manifest (every map part must be committed).
        do_finalize: reduce when every map part is committed (otherwise stop after the map).
        batch_rows: rows per read batch (bounds the read buffer).
        gallery: images per class in the report's gallery (top and last admitted); 0 for none.
        dataset: the dataset manifest for the gallery (default: the logits' lineage).
        retry_failed: retry a map part that failed ``max_attempts`` times before.
        max_attempts: give up on a part after this many failures.

    Returns:
        The selection manifest's path, or None while other map tasks are still missing.
    """
    logits_set = open_logits(logits)
    spec = make_spec(policy, per_class, top_p, logits_set.class_names, logits_set.topk, min_score, balance,
                     soft_targets, rank_at=rank_temperature_of(rank_temperature, logits_set.temperature))
    exclusion = load_exclusion(exclude) if exclude else None
    preflight(logits_set, need_lse1=spec.rank_temperature is not None)
    out = out if is_remote_out(out) else Path(out)
    params = selection_params(logits_set, spec, exclusion)
    maps = map_store(out, params, num_tasks)
    if not finalize_only:
        _run_map(maps, logits_set, spec, exclusion, task_index, num_tasks, batch_rows, retry_failed, max_attempts)
    missing = [i for i in range(num_tasks) if maps.committed(i, verify=False) is None]
    if missing and finalize_only:
        raise ManifestError(f"{maps.out_dir}: cannot finalize, map part(s) {', '.join(map(part_name, missing[:10]))}"
                            f" of {num_tasks} are not committed; run those tasks first")
    if missing or not do_finalize:
        log.info("%s: map task %d/%d done; %d map part(s) pending", out, task_index, num_tasks, len(missing))
        return None
    return reduce_selection(out, logits_set, spec, exclusion, params, maps, num_tasks, batch_rows, gallery, dataset)


def selection_params(logits_set: LogitsSet, spec: SelectSpec, exclusion: "Exclusion | None") -> dict:
    """The selection manifest's params (also the fingerprint of its parts)."""
    lp = logits_set.params
    return {**spec.to_params(), "logits_id": logits_set.id, "dataset_id": lp["dataset_id"],
            "teacher_id": lp["teacher_id"], "num_classes": logits_set.num_classes,
            "class_names": logits_set.class_names, "temperature": logits_set.temperature,
            "topk": logits_set.topk, "exclude_id": exclusion.manifest.id if exclusion else None,
            "selection_schema_version": SCHEMA_VERSION}


def map_store(out: Path | str, params: dict, num_tasks: int) -> PartStore | ObjectPartStore:
    """The map parts of an ``num_tasks``-task run (each task's exact per-class candidates)."""
    fp = fingerprint("select-map", {**params, "num_tasks": num_tasks}, CODE_VERSION)
    return _store(f"{out}/{MAP_DIR}/tasks-{num_tasks}" if is_remote_out(out) else out / MAP_DIR / f"tasks-{num_tasks}",
                  fp)


def _store(out: Path | str, fp: dict) -> PartStore | ObjectPartStore:
    """A part store of Parquet parts: a folder, or a prefix in object storage (``pipeline.objstore``)."""
    return (ObjectPartStore if is_remote_out(out) else PartStore)(out, ".parquet", fp, parquet_rows)


def preflight(logits_set: LogitsSet, need_lse1: bool = False) -> None:
    """Refuse, before any work, logits parts whose metadata or column types differ, naming every one
    (and, with ``need_lse1``, logits without the T = 1 normaliser)."""
    expected = {key: logits_set.params[key] for key in AGREEING}
    expected["schema_version"] = logits_set.params.get("parquet_schema_version", 1)
    bad, first_types = [], None
    for index in range(logits_set.num_parts):
        path = logits_set.part_path(index)
        try:
            schema = open_parquet(path).schema_arrow
        except IntegrityError:
            bad.append(f"{path.name} (unreadable)")
            continue
        meta = read_metadata(schema)
        diffs = [f"{k}={meta.get(k)!r} not {v!r}" for k, v in expected.items() if meta.get(k) != v]
        types = [str(schema.field(c).type) if c in schema.names else None for c in _TYPED]
        first_types = first_types or types
        if types != first_types:
            diffs.append(f"column types {types} differ from the first part's {first_types}")
        if diffs:
            bad.append(f"{path.name} ({'; '.join(diffs)})")
        if need_lse1 and LSE1 not in schema.names:
            raise InputError(f"{path}: no {LSE1} column (logits schema version {meta.get('schema_version')}); "
                             "--rank-temperature 1 needs the T = 1 normaliser: recompute these logits with this "
                             "kdpipe (schema 2 stores it), or drop --rank-temperature")
    if bad:
        raise ManifestError(f"{logits_set.manifest.path}: {len(bad)} logits part(s) differ in temperature, "
                            f"top-K, classes, teacher or schema: {', '.join(bad[:10])}; a selection never "
                            "mixes logits runs: recompute those parts or select from each run separately")


def _run_map(maps: PartStore, logits_set: LogitsSet, spec: SelectSpec, exclusion, task_index: int,
             num_tasks: int, batch_rows: int, retry_failed: bool, max_attempts: int) -> None:
    block = plan_block(task_index, num_tasks, logits_set.num_parts)
    write = lambda tmp: map_block(tmp, logits_set, spec, exclusion, block, batch_rows)
    produce = lambda index: maps.commit(index, write, task_info(task_index, num_tasks))
    views = int((logits_set.params.get("views") or {}).get("count", 1))
    images = block_rows(logits_set, block) // views  # for the ETA
    report = run_parts(maps, [task_index], produce, max_attempts=max_attempts, retry_failed=retry_failed,
                       desc="select map", part_samples=lambda _: images)
    if report.exit_code:
        raise PartFailed(f"{maps.out_dir}: map task {task_index} failed: {report.failed or report.given_up}")


def block_rows(logits_set: LogitsSet, block: range) -> int:
    """Rows of logits parts ``block``, as the manifest lists them."""
    return sum(int(logits_set.manifest.files[i].get("rows", 0)) for i in block)


def map_block(tmp: Path, logits_set: LogitsSet, spec: SelectSpec, exclusion: Exclusion | None, block: range,
              batch_rows: int) -> PartResult:
    """Stream logits parts ``block`` and write their exact per-class candidates to ``tmp``.

    Pass 1 ranks by numbers alone (``ScoreTopK``); pass 2 reads the survivors' payload back (``fetch_payload``)
    and ``exact_rows`` breaks the ties at each class's boundary by key.
    """
    schema = pq.read_schema(source(logits_set.part_path(0)))
    payload = pa.schema([schema.field(c) for c in payload_columns(spec.soft_targets)] + [pa.field(ROW_ID, pa.int64())])
    scorer = Scorer(spec, logits_set.topk, logits_set.temperature, logits_set.num_classes)
    views = "view" in schema.names
    (labels, scores, ids), (images, excluded, compactions) = _rank(logits_set, spec, scorer, exclusion, block,
                                                                   batch_rows, views)
    release_memory()  # pass 1's buffers, before pass 2 allocates through Arrow
    fetched = fetch_payload(logits_set, ids, payload, ROW_ID, batch_rows)
    del ids  # in ``fetched`` now
    release_memory()
    table = exact_rows(labels, scores, fetched, spec.quotas)
    del fetched
    per_class = {CANDIDATES_META: json.dumps(scorer.candidates.tolist()).encode()}  # O(classes): not in receipts
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **per_class})
    write_parquet(table, tmp, compression="lz4", row_group=MAP_ROW_GROUP, indexed=False)  # read back whole, once
    log.info("select map: %d images from logits parts %d..%d, %d candidates kept, %d compactions", images,
             block.start, block.stop - 1, table.num_rows, compactions)
    return PartResult(expected_rows=table.num_rows, input={"logits_parts": [block.start, block.stop]},
                      extra={"images": images, "excluded": excluded}, samples=images)


def _rank(logits_set: LogitsSet, spec: SelectSpec, scorer: Scorer, exclusion: Exclusion | None, block: range,
          batch_rows: int, views: bool) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[int, int, int]]:
    """Pass 1: every logits batch of ``block`` through ``scorer`` into a ``ScoreTopK``; its survivors, and
    (images, images excluded, compactions).

    Reading, row checks and scoring run on ``parallel_parts``' threads (a part each), the ``ScoreTopK`` on this
    one, in the order batches come (scoring may use thresholds a few batches old: they only rise, and
    ``ScoreTopK.add`` applies its current ones).
    """
    read = ["key", "topk_index", "topk_logit", "lse"] + (["view"] if views else [])
    read += [scorer.lse_column] if scorer.lse_column not in read else []
    expected = block_rows(logits_set, block) * spec.depth  # candidates at most: the first-pass buffers' size
    bound = ScoreTopK(np.asarray(spec.quotas), floor=spec.min_score, expected=expected)
    scored = lambda part: (_score(scorer, batch, first_id, bound.thr, exclusion, views)
                           for first_id, batch in numbered_batches(logits_set, range(part, part + 1), read, batch_rows))
    images = excluded = 0
    for labels, scores, ids, seen, dropped in parallel_parts(block, scored):
        bound.add(labels, scores, ids)
        images, excluded = images + seen, excluded + dropped
        advance(seen)  # images ranked so far: the task's live progress
    return bound.result(), (images, excluded, bound.compactions)


def _score(scorer: Scorer, batch: pa.RecordBatch, first_id: int, thr: np.ndarray, exclusion: Exclusion | None,
           views: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """One logits batch's admitted candidates (labels, scores, row ids), images seen and images excluded."""
    dropped = excluded_rows(batch.column("key"), exclusion.keys if exclusion else None)
    excluded = 0 if dropped is None else int(dropped.sum())
    seen = batch.num_rows
    if views:  # multi-view logits: an image is ranked by its centre view (view 0) only
        other = to_numpy(batch.column("view")) != 0
        dropped = other if dropped is None else (dropped | other)
        seen = int((~other).sum())
    labels, scores, rows = scorer(batch, thr, dropped)
    return labels, scores, first_id + rows.astype(np.int64), seen, excluded


def reduce_selection(out: Path, logits_set: LogitsSet, spec: SelectSpec, exclusion: Exclusion | None,
                     params: dict, maps: PartStore, num_tasks: int, batch_rows: int, gallery: int,
                     dataset: str | Path | None) -> Path:
    """Merge the map parts into ``part-000000.parquet``, write the manifest and the report."""
    preload()  # matplotlib, for the report, loads on a thread while the merge reads and writes Parquet
    store = _store(out, fingerprint("select", params, CODE_VERSION))
    receipts = [maps.committed(i) for i in range(num_tasks)]
    if any(r is None for r in receipts):
        raise ManifestError(f"{maps.out_dir}: a map part changed or vanished since it was committed; rerun")
    totals = _map_totals(maps, receipts)
    write = lambda tmp: _reduce_write(tmp, maps, spec, params, num_tasks, batch_rows, totals)
    report = run_parts(store, [0], lambda index: store.commit(index, write), desc="select reduce")
    if report.exit_code:
        raise PartFailed(f"{out}: the reduce failed: {report.failed or report.given_up}")
    stats = {**store.committed(0, verify=False)["extra"], "candidates": totals["candidates"]}
    inputs = [mf.input_ref(logits_set.manifest, out, "logits")]
    if exclusion:
        inputs.append(mf.input_ref(exclusion.manifest, out, "exclude"))
    build = lambda parts: mf.build(
        "selection", stage="select", params=params, files=file_entries(parts), inputs=inputs,
        totals={"rows": sum(p["rows"] for p in parts), "samples": sum(p["rows"] for p in parts),
                "images_read": totals["images"], "excluded": totals["excluded"],
                "classes": logits_set.num_classes})
    if isinstance(store, ObjectPartStore):  # the report is uploaded before the manifest is created
        report = lambda data: report_objects(mf.RemoteManifest(RemotePath(f"{out}/{mf.MANIFEST_NAME}"), data),
                                             stats, gallery=gallery, dataset=dataset)
        return finalize_remote(store, 1, build, lambda data: {**sidecars_for(data), **report(data)})
    report = lambda data: write_report(mf.Manifest(out / mf.MANIFEST_NAME, data), stats, gallery=gallery,
                                       dataset=dataset)
    return finalize(store, 1, with_report(out, with_sidecars(out, build), report))


def with_report(out: Path, build: Callable[[list[dict]], dict],
                report: Callable[[dict], Path]) -> Callable[[list[dict]], dict]:
    """``build`` that also writes the selection report (``report(data)``) before finalize publishes the manifest:
    a selection manifest never precedes its report, so a kill or a full disk in between leaves no manifest and
    the rerun writes both. A rerun over a manifest of the same id repairs a missing or damaged report."""
    def wrapped(receipts: list[dict]) -> dict:
        data = build(receipts)
        target = out / mf.MANIFEST_NAME
        if not target.exists() or mf.load(target).id == data["id"]:
            report(data)
        return data
    return wrapped


def _map_totals(maps: PartStore, receipts: list[dict]) -> dict:
    """Images and exclusions summed over the map receipts; candidates per class summed over the map parts."""
    candidates = np.sum([_map_candidates(maps, i, r) for i, r in enumerate(receipts)], axis=0).astype(np.int64)
    return {"images": sum(r["extra"]["images"] for r in receipts),
            "excluded": sum(r["extra"]["excluded"] for r in receipts), "candidates": candidates.tolist()}


def _map_candidates(maps: PartStore, index: int, receipt: dict) -> list[int]:
    """A map part's candidates per class: in its file metadata (receipts of older kdpipes carried them)."""
    if "candidates" in receipt["extra"]:
        return receipt["extra"]["candidates"]
    return json.loads(pq.read_schema(source(maps.part_path(index))).metadata[CANDIDATES_META])


def _reduce_write(tmp: Path, maps: PartStore, spec: SelectSpec, params: dict, num_tasks: int, batch_rows: int,
                  totals: dict) -> PartResult:
    top = _merge_maps(maps, spec, num_tasks, batch_rows)
    meta = {"schema_version": SCHEMA_VERSION, "logits_id": params["logits_id"], "policy": spec.policy,
            "temperature": params["temperature"], "topk": params["topk"], "top_p": spec.depth,
            **({"rank_temperature": spec.rank_temperature} if spec.rank_temperature is not None else {})}
    table = final_table(top, spec, meta)
    write_parquet(table, tmp)
    _, per_image = np.unique(to_numpy(top.column(ROW_ID)), return_counts=True)
    images = {"unique_images": len(per_image), "multi_label_images": int((per_image > 1).sum()),
              "max_labels_per_image": int(per_image.max()) if len(per_image) else 0}
    counts = {k: totals[k] for k in ("images", "excluded")}  # candidates per class stay out of the receipt
    return PartResult(expected_rows=table.num_rows, input={"map_parts": num_tasks}, extra={**counts, **images},
                      samples=totals["images"])


def _merge_maps(maps: PartStore, spec: SelectSpec, num_tasks: int, batch_rows: int) -> pa.Table:
    """The exact top rows over all map parts (one map part is already exact and sorted)."""
    if num_tasks == 1:
        return pq.ParquetFile(source(maps.part_path(0))).read()
    columns = payload_columns(spec.soft_targets) + [ROW_ID]
    schema = pq.read_schema(source(maps.part_path(0)))
    payload = pa.schema([schema.field(c) for c in columns])
    acc = ClassTopK(np.asarray(spec.quotas), floor=spec.min_score, schema=payload)
    for index in range(num_tasks):
        for batch in pq.ParquetFile(source(maps.part_path(index))).iter_batches(batch_size=batch_rows):
            labels = to_numpy(batch.column("label"))
            acc.add(labels, to_numpy(batch.column("score")), pa.Table.from_batches([batch.select(columns)]))
    return acc.result()

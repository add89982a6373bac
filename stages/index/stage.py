"""``kdpipe index``: a dataset manifest that points at existing WebDataset shards where they live.

Sources (``stages.index.sources``) expand to shard locations; part i is shard i: its record (location, bytes,
sha256, samples, image extension, ``no_image``, label counts; ``stages.index.scan``) is committed as a small
JSON part with its receipt through the ``PartStore``, so array tasks index 100k shards in parallel and a rerun
skips what is done. Finalize writes a ``dataset`` manifest whose ``files`` are declared external entries
(``pipeline.paths``): the output folder holds records and the manifest, never a copy of a shard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.hashing import sha256_json
from pipeline.objstore import ObjectPartStore, finalize_remote, is_remote_out
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.planning import plan_block
from pipeline.tasks import TaskReport, failure_totals, finalize, run_parts, task_info
from stages.index.options import IndexOptions
from stages.index.scan import Labels, scan_shard
from stages.index.sources import expand_sources

log = logging.getLogger(__name__)
CODE_VERSION = "index-1"


@dataclass
class IndexResult:
    """The manifest (None until every shard is indexed) and what this task did."""

    manifest: Path | None
    report: TaskReport
    shards: int


def _record_rows(path: Path) -> int:
    """Samples of a written record (the PartStore's row count; raises on a damaged record)."""
    return int(json.loads(Path(path).read_bytes())["record"]["samples"])


def read_classes(path: Path | None) -> list[str] | None:
    """Class names from a text file, one a line (blank lines and ``#`` comments skipped)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"--classes {path}: cannot read ({exc})") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if len(set(names)) != len(names) or not names:
        raise InputError(f"--classes {path}: needs one unique class name a line ({len(names)} names read)")
    return names


def index(sources: list[str], out: str | Path, *, label_from: str | None = IndexOptions.label_from,
          classes: Path | None = IndexOptions.classes, check_stats: bool = IndexOptions.check_stats,
          task_index: int = 0, num_tasks: int = 1, retry_failed: bool = False, max_attempts: int = 3,
          do_finalize: bool = True, finalize_only: bool = False) -> IndexResult:
    """Index the shards of ``sources`` into ``out``; finalize when every shard is indexed.

    Args:
        sources: local paths, folders, globs, ``{a..b}`` patterns, list files, URLs (``stages.index.sources``).
        out: output folder (records, receipts, manifest); it never holds shard data.
        label_from: ``cls`` or ``json:FIELD``; None: unlabeled.
        classes: class names file (with ``label_from``).
        check_stats: cross-check img2dataset's ``_stats.json`` ``successes``.
        task_index: this array task; it indexes its ``plan_block`` of shards.
        num_tasks: number of array tasks.
        retry_failed: retry shards that failed ``max_attempts`` times.
        max_attempts: give up on a shard after this many failed attempts.
        do_finalize: write the manifest when every shard is indexed.
        finalize_only: index nothing, only write the manifest.
    """
    locations = expand_sources([str(s) for s in sources])
    if not locations:
        raise InputError(f"{' '.join(map(str, sources))}: no .tar shard found (a folder is searched for *.tar)")
    labels = Labels.parse(label_from, read_classes(classes))
    out = out if is_remote_out(out) else Path(out)
    if not is_remote_out(out):
        _refuse_inside(out, locations)
    params = {"locations_sha256": sha256_json(locations), "shards": len(locations), "label_from": label_from,
              "class_names_sha256": sha256_json(list(labels.names)) if labels else None, "check_stats": check_stats}
    kind = ObjectPartStore if is_remote_out(out) else PartStore  # a prefix in object storage: pipeline.objstore
    store = kind(out, ".json", fingerprint("index", params, CODE_VERSION), _record_rows)
    block = [] if finalize_only else list(plan_block(task_index, num_tasks, len(locations)))

    def produce(i: int) -> dict:
        return store.commit(i, _writer(locations[i], labels, check_stats), task_info(task_index, num_tasks))
    report = run_parts(store, block, produce, max_attempts=max_attempts, retry_failed=retry_failed, desc="index",
                       num_parts=len(locations))
    done = finalize_only or (do_finalize and all(store.committed(i, verify=False) is not None
                                                 for i in range(len(locations))))
    manifest = _finalize(store, len(locations), labels, sources, out) if done else None
    return IndexResult(manifest, report, len(locations))


def _refuse_inside(out: Path, locations: list[str]) -> None:
    """The output folder holds no data: refuse an ``--out`` that contains an indexed shard."""
    root = out.resolve()
    inside = next((loc for loc in locations if "://" not in loc and root in Path(loc).parents), None)
    if inside is not None:
        raise InputError(f"--out {out}: holds the shard {inside}; write the index to its own folder")


def _writer(location: str, labels: Labels | None, check_stats: bool):
    def write(tmp: Path) -> PartResult:
        found = scan_shard(location, labels, check_stats)
        body = {"record": found["record"], "per_class": found["per_class"]}
        tmp.write_bytes(json.dumps(body, sort_keys=True).encode())
        return PartResult(expected_rows=found["record"]["samples"], failures=found["failures"],
                          input={"location": location, "sha256": found["record"]["sha256"]}, extra=body)
    return write


def _finalize(store: PartStore, count: int, labels: Labels | None, sources: list, out: Path) -> Path:
    params = {"labeled": labels is not None, "source": "index", "split": None,
              "label_from": labels.source if labels else None}  # no locations: the id is the pool's content
    if labels is not None:
        params.update(class_names=list(labels.names), num_classes=len(labels.names))

    def build(receipts: list[dict]) -> dict:
        records = [r["extra"]["record"] for r in receipts]
        files = [{k: v for k, v in rec.items() if k != "images" and v is not None} for rec in records]
        images = sum(rec["images"] for rec in records)
        if images == 0:
            raise InputError(f"{' '.join(map(str, sources))}: {len(records)} shard(s) hold no sample with an image "
                             f"member ({sum(rec['no_image'] for rec in records)} without one); nothing to index")
        totals = {"samples": images, "shards": len(records), "failures": failure_totals(receipts)}
        if labels is not None:
            per_class = [sum(r["extra"]["per_class"][c] for r in receipts) for c in range(len(labels.names))]
            totals.update(classes=len(labels.names), per_class=per_class)
        return mf.build("dataset", stage="index", params=params, files=files, totals=totals)
    return finalize_remote(store, count, build) if isinstance(store, ObjectPartStore) else finalize(store, count, build)

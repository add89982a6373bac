"""Growing a dataset: a base dataset's shards, byte for byte, then a new source's shards, as one new dataset.

``ingest --base OLD`` writes a new dataset manifest whose shards 0..n-1 are the base's shards in the base's
order with the base's sha256 (hard-linked into the new folder when the filesystem allows, else copied; their
bytes are never rewritten), followed by the new source's shards. The base goes into ``inputs`` with role
``base``. Because the old shards keep their sha256, ``logits --reuse`` can recognise them and rewrite their
old logits parts instead of running the teacher again (see ``stages.logits_reuse``).

Labels follow the base: a labeled base needs a labeled source with the same class names; over an unlabeled
base the new source's labels are dropped. Keys stay unique: each base shard is read back once when it is
linked (sha256, sample count) and a new source key found in it fails that part, naming the keys.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.planning import plan_block
from pipeline.tasks import failure_totals, file_entries, finalize, run_parts, task_info
from stages.ingest.drift import check_drift
from stages.ingest.options import IngestOptions
from stages.ingest.sources import Item, discover
from stages.ingest.stage import CODE_VERSION, _write_part, plan_shards
from stages.shardio import ShardStats, count_samples, read_shard

log = logging.getLogger(__name__)
KEPT_BASE_PARAMS = ("preprocess",)  # dataset params that downstream stages check and a grown set must keep


def ingest_grown(src: str, out: Path, base: str | Path, *, shard_size: int = IngestOptions.shard_size,
                 shard_bytes: int = IngestOptions.shard_bytes,
                 task_index: int = 0, num_tasks: int = 1, do_finalize: bool = True) -> Path | None:
    """Write ``out``: the shards of the ``base`` dataset manifest, then ``src``'s shards; return its manifest.

    Args:
        src: the new source (as for ``ingest``: a folder, a file list or ``digits``).
        out: the new dataset's folder (not the base's).
        base: the dataset manifest (file or folder) being grown.
        shard_size: samples per new shard at most.
        shard_bytes: bytes per new shard, about.
        task_index: this array task.
        num_tasks: array size; each task writes its block of the new dataset's shards (old and new).
        do_finalize: write the manifest when every part is committed.

    Returns:
        The new manifest's path, or None while parts of other tasks are missing.

    Raises:
        InputError: the source is empty, its classes disagree with the base's, or ``out`` is the base's folder.
    """
    old = mf.load(base, kind="dataset")
    out = Path(out)
    if out.resolve() == old.folder.resolve():
        raise InputError(f"--out {out}: is the base dataset's own folder; write the grown dataset to a new folder")
    source = discover(src)
    if not source.items:
        raise InputError(f"{src}: no files found")
    items, names = _items_for(old, source, src)
    new_shards = plan_shards([i.size for i in items], shard_size, shard_bytes)
    params = {"source": src, "shard_size": shard_size, "shard_bytes": shard_bytes, "split": None,
              "split_spec": None, "seed": 0, "labels_hidden": not names and source.labeled,
              "base_id": old.id, "base_shards": len(old.files)}
    store = PartStore(out, ".tar", fingerprint("ingest", params, CODE_VERSION), count_samples)
    total = len(old.files) + len(new_shards)
    new_keys = {i.key for i in items}

    def produce(index: int) -> dict:
        if index < len(old.files):
            return store.commit(index, _link_base_shard(old, index, new_keys), task_info(task_index, num_tasks))
        chosen = [items[j] for j in new_shards[index - len(old.files)]]
        return store.commit(index, _write_part(chosen, out, index), task_info(task_index, num_tasks))

    block = list(plan_block(task_index, num_tasks, total))
    check_drift(store, items, [range(0)] * len(old.files) + new_shards, block, src)  # base parts: no listing
    report = run_parts(store, block, produce, desc="ingest (grow)", num_parts=total)
    if report.exit_code:
        raise InputError(f"{out}: {len(report.failed) + len(report.given_up)} shard(s) failed; see the log")
    if not do_finalize or any(store.committed(i, verify=False) is None for i in range(total)):
        return None
    return _finalize(store, total, old, params, names, source.kind)


def _items_for(old: mf.Manifest, source, src: str) -> tuple[list[Item], list[str]]:
    """The source's items (labels dropped over an unlabeled base) and the grown set's class names."""
    names = list(old.params.get("class_names") or [])
    if not old.params.get("labeled"):
        return [replace(i, label=None) for i in source.items], []
    if not source.labeled or list(source.class_names) != names:
        raise InputError(f"{src}: the base {old.path} is labeled with classes {names[:5]}..., but this source "
                         f"has {list(source.class_names)[:5] if source.labeled else 'no labels'}; grow a labeled "
                         "dataset with a labeled folder of the same class subfolders")
    return list(source.items), names


def _link_base_shard(old: mf.Manifest, index: int, new_keys: set[str]):
    """Writer of part ``index``: the base's shard ``index`` hard-linked (or copied), read back once to check its
    sha256 and sample count and that none of its keys is a key of the new source."""
    entry = old.files[index]

    def write(tmp: Path) -> PartResult:
        where = old.file_path(entry)
        if isinstance(where, str):
            raise InputError(f"{old.path}: shard {entry['path']} is a URL; growing needs local shards")
        try:
            os.link(where, tmp)
        except OSError:  # another filesystem, or links not allowed: copy the bytes unchanged
            shutil.copyfile(where, tmp)
        stats = ShardStats(str(where))
        clash = [key for key, _ in read_shard(tmp, stats, entry["sha256"], int(entry["samples"])) if key in new_keys]
        if clash:
            raise InputError(f"{where}: {len(clash)} key(s) of the new source are already in this base shard "
                             f"({', '.join(clash[:3])}); keys must stay unique: rename or leave out those files")
        return PartResult(expected_rows=int(entry["samples"]),
                          input={"base": old.id, "shard": index, "path": entry["path"], "sha256": entry["sha256"]})
    return write


def _finalize(store: PartStore, total: int, old: mf.Manifest, params: dict, names: list[str],
              source_kind: str) -> Path:
    manifest_params = {**params, "labeled": bool(names), "source_kind": source_kind, "class_names": names,
                       "num_classes": len(names),
                       **{k: old.params[k] for k in KEPT_BASE_PARAMS if k in old.params}}
    inputs = [mf.input_ref(old, store.out_dir, "base")]
    build = lambda receipts: mf.build(
        "dataset", stage="ingest", params=manifest_params, files=file_entries(receipts, "samples"), inputs=inputs,
        totals={"samples": sum(r["rows"] for r in receipts), "failures": failure_totals(receipts),
                "classes": len(names)})
    return finalize(store, total, build)

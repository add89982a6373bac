"""Reusing old logits parts for the unchanged shards of a grown dataset (``logits --reuse OLD``).

A grown dataset (``ingest --base``) keeps its old shards byte for byte. When the old logits were made with
every parameter equal except ``dataset_id`` (teacher, K, T, dtype, compute batch, compute mode, views,
preprocess, embeddings), a shard whose sha256 and sample count equal those an old part's receipt records as
its input has the same rows as before, so its part is the old part rewritten: same rows, the ``shard``
column renumbered, the file metadata's ``dataset_id`` and ``shard`` updated, written with the stage's own
Parquet writer. The result is byte-identical to computing the
part, and the teacher never runs for it. Parts go through ``PartStore.commit`` like computed ones; their
receipts carry the old receipt's failures and ``extra.reused_from``. A part that cannot be reused (old part
damaged, receipt missing) is logged and left to the normal computation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline.errors import InputError, IntegrityError, KdpipeError
from pipeline.parts import PartResult, PartStore, part_name, scan_folder
from pipeline.signals import check_stop
from stages.artifacts.logits_format import META_KEY, read_metadata
from stages.artifacts.logits_reader import LogitsSet, open_logits
from stages.logits.write import part_metadata, write_part

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    """Old logits to reuse and, per new shard index, the old part with the same shard bytes."""

    logits: LogitsSet
    parts: dict[int, int]
    receipts: dict[int, dict]

    manifest = property(lambda self: self.logits.manifest)

    def input_ref(self, out: Path) -> dict:
        """The new logits manifest's lineage entry for the old logits (role ``base``)."""
        return mf.input_ref(self.manifest, out, "base")


def load_base(reuse: str | Path, params: dict, data: mf.Manifest) -> Base:
    """Check that ``reuse`` (old logits) was made like the new ones and map new shards to old parts.

    Args:
        reuse: the old logits manifest (file or folder).
        params: the new logits' params (``stages.logits.prepare``).
        data: the new dataset manifest.

    Raises:
        InputError: the old logits were made with other parameters.
    """
    logits = open_logits(reuse)
    old = logits.manifest
    differ = [k for k in sorted(set(old.params) | set(params))
              if k != "dataset_id" and old.params.get(k) != params.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {old.params.get(k)!r} vs {params.get(k)!r}" for k in differ[:4])
        raise InputError(f"--reuse {old.path}: made with other parameters ({shown}); only dataset_id may differ. "
                         "Reuse logits of the same teacher and options, or drop --reuse")
    receipts = _old_receipts(old)
    by_input = {(r["input"]["sha256"], int(r["input"]["samples"])): i for i, r in receipts.items()}
    parts = {j: by_input[(e["sha256"], int(e["samples"]))] for j, e in enumerate(data.files)
             if (e["sha256"], int(e["samples"])) in by_input}
    log.info("--reuse %s: %d of %d shard(s) are unchanged; their logits are reused", old.path, len(parts),
             len(data.files))
    return Base(logits, parts, receipts)


def _old_receipts(old: mf.Manifest) -> dict[int, dict]:
    """Receipts of the old parts that describe the files the old manifest lists (one scandir)."""
    found = scan_folder(old.folder).receipts
    good = {i: r for i, r in found.items() if i < len(old.files) and r.get("sha256") == old.files[i]["sha256"]
            and isinstance(r.get("input"), dict) and "sha256" in r["input"] and "samples" in r["input"]}
    if len(good) < len(old.files):
        log.warning("%s: %d of %d parts have no matching receipt; they cannot be reused", old.folder,
                    len(old.files) - len(good), len(old.files))
    return good


def reuse_parts(base: Base, store: PartStore, block: range, data: mf.Manifest, params: dict, task: dict) -> list[int]:
    """Commit the reusable parts of ``block`` that are not committed yet; return the indices committed.

    A part that cannot be reused is logged and left for the teacher (it is computed as usual).
    """
    store.prepare()
    done = []
    for index in (i for i in block if i in base.parts):
        check_stop(f"{store.out_dir} before {part_name(index)}")
        if store.committed(index) is not None:
            continue
        writer = _rewriter(base, base.parts[index], index, data.files[index], params)
        try:
            store.commit(index, writer, task)
            done.append(index)
        except (KdpipeError, OSError) as exc:
            log.warning("%s: cannot reuse old part %s (%s); it will be computed", part_name(index),
                        part_name(base.parts[index]), exc)
    log.info("%s: %d part(s) reused from %s", store.out_dir, len(done), base.manifest.path)
    return done


def _rewriter(base: Base, old_index: int, index: int, entry: dict, params: dict):
    """Writer of new part ``index``: old part ``old_index`` with the new shard number and dataset id."""
    old = base.manifest

    def write(tmp: Path) -> PartResult:
        receipt = base.receipts[old_index]
        table = base.logits.read_part(old_index)
        expected = part_metadata({**params, "dataset_id": old.params["dataset_id"]}, old_index)
        if read_metadata(table.schema) != json.loads(json.dumps(expected)):
            raise IntegrityError(f"{old.folder / old.files[old_index]['path']}: its file metadata differs from "
                                 "what this kdpipe writes (another code version)")
        write_part(_renumbered(table, index, part_metadata(params, index)), tmp)
        return PartResult(expected_rows=table.num_rows, failures=receipt.get("failures", {}),
                          samples=int(entry["samples"]),
                          input={"shard": index, "path": entry["path"], "sha256": entry["sha256"],
                                 "samples": entry["samples"]},
                          extra={"reused_from": {"logits_id": old.id, "part": old_index,
                                                 "sha256": old.files[old_index]["sha256"]}})
    return write


def _renumbered(table: pa.Table, shard: int, meta: dict) -> pa.Table:
    """``table`` with every ``shard`` value set to ``shard`` and the kdpipe metadata replaced by ``meta``."""
    position = table.schema.get_field_index("shard")
    column = pa.array(np.full(table.num_rows, shard, np.int32))
    table = table.set_column(position, table.schema.field(position), column)
    metadata = dict(table.schema.metadata or {})
    metadata[META_KEY] = json.dumps(meta, sort_keys=True).encode()
    return table.cast(_as_written(table.schema)).replace_schema_metadata(metadata)


def _as_written(schema: pa.Schema) -> pa.Schema:
    """The schema as the stage builds it: Parquet reads fixed-size lists back with the child name ``element``,
    the stage's arrays carry ``item`` (``pa.list_``), and the name is part of the stored Arrow schema bytes."""
    fields = [pa.field(f.name, pa.list_(f.type.value_type, f.type.list_size), f.nullable, f.metadata)
              if pa.types.is_fixed_size_list(f.type) else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


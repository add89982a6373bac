"""Test data factories: synthetic logits artifacts that follow the logits contract exactly.

Tests of the stages downstream of logits (select, dedup, reshard) use these to build inputs of a chosen
shape without running a teacher. Parts go through ``PartStore.commit`` and the manifest through
``pipeline.manifest.build``, so they are what the logits stage itself produces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.tasks import file_entries, finalize, run_parts
from pipeline.verify import parquet_rows
from stages.artifacts.logits_format import SCHEMA_VERSION, arrow_schema
from stages.imaging import Preprocess

FAKE_TEACHER_ID = "f" * 64
FAKE_DATASET_ID = "d" * 64


def logits_table(keys: list[str], shard: int, logits: np.ndarray, topk: int, temperature: float,
                 meta: dict, embeddings: np.ndarray | None = None) -> pa.Table:
    """One logits part from full logits ``(N, C)``: top-K by logit descending, ties by class id."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :topk]
    top = np.take_along_axis(logits, order, axis=1).astype(np.float32)
    scaled = logits.astype(np.float64) / temperature
    peak = scaled.max(axis=1, keepdims=True)
    lse = (peak[:, 0] + np.log(np.exp(scaled - peak).sum(axis=1))).astype(np.float32)
    num_classes = logits.shape[1]
    dim = None if embeddings is None else embeddings.shape[1]
    schema = arrow_schema(num_classes, topk, dim, metadata=meta)
    index_type = schema.field("topk_index").type.value_type
    columns = {
        "key": pa.array(keys, pa.string()),
        "shard": pa.array(np.full(len(keys), shard, np.int32)),
        "topk_index": pa.FixedSizeListArray.from_arrays(pa.array(order.ravel(), index_type), topk),
        "topk_logit": pa.FixedSizeListArray.from_arrays(pa.array(top.ravel(), pa.float32()), topk),
        "lse": pa.array(lse),
    }
    if embeddings is not None:
        flat = pa.array(embeddings.astype(np.float16).ravel(), pa.float16())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_pydict(columns, schema=schema)


def make_logits(out: Path, shards: list[tuple[list[str], np.ndarray]], *, topk: int = 5, temperature: float = 1.0,
                embeddings: list[np.ndarray] | None = None, dataset_id: str = FAKE_DATASET_ID,
                teacher_id: str = FAKE_TEACHER_ID, class_names: list[str] | None = None,
                data: Path | None = None) -> Path:
    """Write a complete logits artifact in ``out`` from per-shard (keys, full logits); return its manifest path.

    With ``data`` (a dataset manifest) the artifact's dataset id and its lineage input (role ``data``) are
    that dataset's, as the logits stage writes them.
    """
    inputs = []
    if data is not None:
        dataset = mf.load(data, kind="dataset")
        dataset_id, inputs = dataset.id, [mf.input_ref(dataset, Path(out), "data")]
    num_classes = shards[0][1].shape[1]
    names = class_names or [str(c) for c in range(num_classes)]
    meta = {"schema_version": SCHEMA_VERSION, "temperature": temperature, "topk": topk,
            "num_classes": num_classes, "teacher_id": teacher_id, "dataset_id": dataset_id}
    store = PartStore(Path(out), ".parquet", fingerprint("logits-factory", meta, "factory-1"),
                      parquet_rows)

    def produce(index: int) -> dict:
        keys, logits = shards[index]
        emb = None if embeddings is None else embeddings[index]
        table = logits_table(keys, index, logits, topk, temperature, meta, emb)
        def write(tmp: Path) -> PartResult:
            pq.write_table(table, tmp, compression="zstd")
            return PartResult(expected_rows=len(keys), input={"shard": index})
        return store.commit(index, write)

    run_parts(store, range(len(shards)), produce)
    params = {**meta, "class_names": names, "preprocess": Preprocess().to_dict(),
              "views": {"count": 1, "policy": "centre", "aug": None},
              "embedding_dim": None if embeddings is None else int(embeddings[0].shape[1]),
              "logit_dtype": "float32", "parquet_schema_version": SCHEMA_VERSION}
    params.pop("schema_version")
    build = lambda receipts: mf.build(
        "logits", stage="factory", params=params, files=file_entries(receipts), inputs=inputs,
        totals={"samples": sum(r["rows"] for r in receipts), "rows": sum(r["rows"] for r in receipts)})
    return finalize(store, len(shards), build)


def random_shards(rng: np.random.Generator, num_shards: int, rows: int, num_classes: int,
                  prefix: str = "img", ties: bool = False) -> list[tuple[list[str], np.ndarray]]:
    """Random full logits per shard; with ``ties`` logits are rounded so that equal scores are common."""
    out = []
    for shard in range(num_shards):
        logits = rng.normal(size=(rows, num_classes)).astype(np.float32) * 3
        if ties:
            logits = np.round(logits)
        keys = [f"{prefix}-{shard:03d}-{i:05d}" for i in range(rows)]
        out.append((keys, logits))
    return out


def make_selection(out: Path, logits_manifest: Path, *, per_class: int = 3, soft_targets: bool = True,
                   extra_rows: list[dict] | None = None) -> Path:
    """A selection artifact per the selection contract (argmax label, top ``per_class`` by p(label|x) at T).

    ``extra_rows`` (dicts with key, shard, label, and optionally dup) are appended before sorting, e.g. a
    planted key that is not in its shard, or a key selected for a second class; their soft targets are
    the logits row of their key when it exists, else zeros.
    """
    from stages.artifacts.logits_reader import open_logits

    logits = open_logits(logits_manifest)
    table = pa.concat_tables([logits.read_part(i) for i in range(logits.num_parts)])
    rows = _argmax_rows(table, logits.temperature)
    by_class: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["label"], -r["score"], r["key"])):
        by_class.setdefault(row["label"], []).append(row)
    chosen = [r for members in by_class.values() for r in members[:per_class]]
    lookup = {r["key"]: r for r in rows}
    for extra in extra_rows or []:
        base = lookup.get(extra["key"], {"topk_index": [0] * logits.topk, "topk_logit": [0.0] * logits.topk,
                                         "lse": 0.0, "score": 0.0})
        chosen.append({**base, "dup": 0, **extra})
    return _write_selection(Path(out), logits, chosen, per_class, soft_targets)


def _argmax_rows(table: pa.Table, temperature: float) -> list[dict]:
    out = []
    for row in table.select(["key", "shard", "topk_index", "topk_logit", "lse"]).to_pylist():
        score = float(np.float32(np.exp(row["topk_logit"][0] / temperature - row["lse"])))
        out.append({**row, "label": int(row["topk_index"][0]), "score": score, "dup": 0})
    return out


def _write_selection(out: Path, logits, rows: list[dict], per_class: int, soft_targets: bool) -> Path:
    rows = sorted(rows, key=lambda r: (r["label"], -r["score"], r["key"], r.get("dup", 0)))
    ranks: dict[int, int] = {}
    for row in rows:
        row["rank"] = ranks.get(row["label"], 0)
        ranks[row["label"]] = row["rank"] + 1
    index_type = logits.read_part(0).schema.field("topk_index").type
    columns = {"key": pa.array([r["key"] for r in rows], pa.string()),
               "shard": pa.array([r["shard"] for r in rows], pa.int32()),
               "label": pa.array([r["label"] for r in rows], pa.int32()),
               "score": pa.array([r["score"] for r in rows], pa.float32()),
               "rank": pa.array([r["rank"] for r in rows], pa.int32()),
               "dup": pa.array([r.get("dup", 0) for r in rows], pa.int16())}
    if soft_targets:
        columns["topk_index"] = pa.array([r["topk_index"] for r in rows], index_type)
        columns["topk_logit"] = pa.array([r["topk_logit"] for r in rows], pa.list_(pa.float32(), logits.topk))
        columns["lse"] = pa.array([r["lse"] for r in rows], pa.float32())
    table = pa.table(columns)
    params = {"policy": "topk", "logits_id": logits.id, "dataset_id": logits.dataset_id,
              "teacher_id": logits.teacher_id, "num_classes": logits.num_classes,
              "class_names": logits.class_names, "temperature": logits.temperature, "topk": logits.topk,
              "per_class": per_class, "top_p": 1, "soft_targets": soft_targets}
    store = PartStore(out, ".parquet", fingerprint("select-factory", params, "factory-1"),
                      parquet_rows)

    def write(tmp: Path) -> PartResult:
        pq.write_table(table, tmp)
        return PartResult(expected_rows=len(rows))

    run_parts(store, [0], lambda index: store.commit(index, write))
    inputs = [mf.input_ref(logits.manifest, out, "logits")]
    build = lambda receipts: mf.build("selection", stage="factory", params=params, inputs=inputs,
                                      files=file_entries(receipts), totals={"rows": len(rows)})
    return finalize(store, 1, build)


def make_multiview_logits(out: Path, data: Path, teacher: Path, spec, *, topk: int = 5, temperature: float = 1.0,
                          logit_dtype: str = "float32", batch_size: int = 64, edit=None) -> Path:
    """A real multi-view logits artifact (``stages/views_format`` layout): the teacher card run on every view.

    One part per dataset shard, one row per (key, view) made with ``stages.views.render_shard_views``;
    inputs ``data`` and ``teacher`` are recorded with their paths. ``edit(part_index, table) -> table``
    may tamper with a part before it is committed (the manifest then matches the tampered part).
    """
    import torch

    from stages.artifacts.cards import load_classifier, preprocess_of
    from stages.artifacts.views import with_views
    from stages.imaging import find_image, normalise
    from stages.shardio import ShardStats, read_shard
    from stages.views.render import render_shard_views
    from stages.views.spec import manifest_views

    dataset = mf.load(data, kind="dataset")
    model, card = load_classifier(teacher)
    pp = preprocess_of(card)
    names = list(card.params["class_names"])
    meta = {"schema_version": SCHEMA_VERSION, "temperature": temperature, "topk": topk,
            "num_classes": len(names), "teacher_id": card.id, "dataset_id": dataset.id}
    store = PartStore(Path(out), ".parquet", fingerprint("logits-factory-views", {**meta, "aug": spec.to_dict()},
                                                         "factory-1"), parquet_rows)

    def produce(index: int) -> dict:
        entry = dataset.files[index]
        stats = ShardStats(entry["path"])
        samples = ((k, find_image(f)) for k, f in read_shard(dataset.file_path(entry), stats, entry["sha256"]))
        rendered = list(render_shard_views(samples, spec, pp, stats.fail))
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(rendered), batch_size):
                batch = torch.from_numpy(np.stack([r.pixels for r in rendered[start:start + batch_size]]))
                chunks.append(model(normalise(batch, pp)).numpy())
        logits = np.concatenate(chunks).astype(np.dtype(logit_dtype)).astype(np.float32)
        table = logits_table([r.key for r in rendered], index, logits, topk, temperature, meta)
        table = with_views(table.cast(_logit_schema(table.schema, logit_dtype)), [r.view for r in rendered], spec)
        table = edit(index, table) if edit else table

        def write(tmp: Path) -> PartResult:
            pq.write_table(table, tmp, compression="zstd")
            return PartResult(expected_rows=table.num_rows, failures=stats.failures, input={"shard": index})
        return store.commit(index, write)

    run_parts(store, range(len(dataset.files)), produce)
    params = {**meta, "class_names": names, "preprocess": pp.to_dict(), "views": manifest_views(spec),
              "embedding_dim": None, "logit_dtype": logit_dtype, "parquet_schema_version": SCHEMA_VERSION}
    params.pop("schema_version")
    inputs = [mf.input_ref(dataset, out, "data"), mf.input_ref(card, out, "teacher")]
    build = lambda receipts: mf.build(
        "logits", stage="factory", params=params, files=file_entries(receipts), inputs=inputs,
        totals={"samples": sum(r["rows"] for r in receipts) // spec.views, "rows": sum(r["rows"] for r in receipts)})
    return finalize(store, len(dataset.files), build)


def _logit_schema(schema: pa.Schema, logit_dtype: str) -> pa.Schema:
    """``schema`` with ``topk_logit`` stored as ``logit_dtype`` (float16 or float32)."""
    field = schema.field("topk_logit")
    value = pa.float16() if logit_dtype == "float16" else pa.float32()
    typed = pa.field("topk_logit", pa.list_(value, field.type.list_size), nullable=False)
    return schema.set(schema.get_field_index("topk_logit"), typed)


def make_exclusion(out: Path, keys: list[str], reason: str = "near_duplicate", threshold: float = 0.95) -> Path:
    """An exclusion artifact (the dedup contract: key, reason, matched_key, similarity) dropping ``keys``."""
    table = pa.table({"key": pa.array(keys, pa.string()), "reason": pa.array([reason] * len(keys), pa.string()),
                      "matched_key": pa.array(["" for _ in keys], pa.string()),
                      "similarity": pa.array(np.ones(len(keys), np.float32))})
    store = PartStore(Path(out), ".parquet", fingerprint("exclusion-factory", {"keys": keys}, "factory-1"),
                      parquet_rows)

    def write(tmp: Path) -> PartResult:
        pq.write_table(table, tmp)
        return PartResult(expected_rows=len(keys))

    run_parts(store, [0], lambda index: store.commit(index, write))
    build = lambda receipts: mf.build("exclusion", stage="factory", params={"threshold": threshold},
                                      files=file_entries(receipts), totals={"rows": len(keys)})
    return finalize(store, 1, build)

"""Evaluate: a model card on a dataset -> top-1/top-5, per-class accuracy, confusion matrix, teacher agreement.

The model's logits are computed by the logits stage itself (``stages.logits.compute_logits``: all classes,
float32, T = 1, into ``OUT/logits/``; restartable and verifiable like any logits artifact, and one
computation serves any teacher temperature, since the KL is taken from the full logits); this module
only joins them with the true labels (the shards' ``cls``, or a ``key,label`` Parquet such as the hidden
labels ingest writes for an unlabeled split) and, when given, with a teacher's stored logits of the same
dataset, shard by shard (memory bounded by one shard and classes^2). ``pseudo_label_precision`` measures
a selection's labels against true labels. Metric definitions: ``stages.eval_metrics``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import LogitsSet, open_logits
from stages.artifacts.parquet import open_parquet
from stages.artifacts.reports import publish_report
from stages.artifacts.selection import SelectionRows
from stages.evaluate.metrics import Accumulator
from stages.evaluate.options import EvaluateOptions
from stages.evaluate.report import (
    confusion_csv,
    confusion_png,
    evaluation_markdown,
    per_class_png,
    precision_markdown,
    report_json,
)
from stages.logits.stage import check_card_against_data, compute_logits  # the one declared cross-stage import
from stages.shardio import ShardStats, read_shard, with_cls

log = logging.getLogger(__name__)
LOGITS_DIR = "logits"
_COLUMNS = ["key", "topk_index", "topk_logit", "lse"]


class Labels:
    """True labels by key for one dataset shard: from a ``key,label`` Parquet, else the shards' ``cls``."""

    def __init__(self, data: mf.Manifest, parquet: str | Path | None, num_classes: int):
        self.data, self.num_classes = data, num_classes
        self.parquet = Path(parquet) if parquet is not None else None
        if self.parquet is not None:
            _check_labels_file(self.parquet)
        self.source = f"parquet:{self.parquet.name}" if self.parquet else (
            "shards" if data.params.get("labeled") else None)

    def for_keys(self, shard: int, keys: list[str]) -> np.ndarray:
        """Labels of ``keys`` (rows of dataset shard ``shard``); -1 where unknown."""
        if self.parquet is not None:
            found = self._from_parquet(keys)
        elif self.source == "shards":
            found = self._from_shard(shard)
        else:
            found = {}
        labels = np.array([found.get(k, -1) for k in keys], dtype=np.int64)
        bad = (labels >= self.num_classes) | (labels < -1)
        if bad.any():
            raise InputError(f"{self.parquet or self.data.path}: label {labels[bad][0]} of key "
                             f"{keys[int(np.argmax(bad))]} is outside the model's {self.num_classes} classes")
        return labels

    def _from_parquet(self, keys: list[str]) -> dict[str, int]:
        con = duckdb.connect()
        con.register("wanted", pa.table({"key": pa.array(keys, pa.string())}))
        rows = con.execute("SELECT l.key, l.label FROM read_parquet(?) l JOIN wanted w USING (key)",
                           [str(self.parquet)]).fetchall()
        found = dict(rows)
        if len(found) != len(rows):
            raise InputError(f"{self.parquet}: a key appears more than once; one label per key")
        return {k: int(v) for k, v in found.items() if v is not None}

    def _from_shard(self, shard: int) -> dict[str, int]:
        entry = self.data.files[shard]
        path = self.data.file_path(entry)
        stats = ShardStats(str(path))
        label_from, names = self.data.params.get("label_from"), self.data.params.get("class_names") or ()
        labels = {}
        for key, fields in read_shard(path, stats, entry["sha256"], entry["samples"]):
            fields = with_cls(fields, label_from, names)
            if "cls" in fields:
                labels[key] = int(fields["cls"])
        return labels


def _check_labels_file(path: Path) -> None:
    names = open_parquet(path, "Parquet labels file", InputError).schema_arrow.names
    if "key" not in names or "label" not in names:
        raise InputError(f"{path}: a labels file needs columns key and label (has {', '.join(names)})")


def check_inputs(card: mf.Manifest, data: mf.Manifest, teacher: LogitsSet | None) -> None:
    """Refuse, before any work, a card or teacher logits that do not fit the dataset."""
    if card.kind not in ("model", "teacher"):
        raise InputError(f"{card.path}: is a {card.kind!r} manifest; --model needs a model or teacher card")
    check_card_against_data(card, data)
    if teacher is None:
        return
    if teacher.dataset_id != data.id:
        raise InputError(f"--teacher-logits {teacher.manifest.path} were computed on dataset "
                         f"{teacher.dataset_id[:12]}, not on {data.path} ({data.id[:12]}); give the teacher logits of the same data")
    if teacher.num_classes != int(card.params["num_classes"]):
        raise InputError(f"--teacher-logits {teacher.manifest.path} have {teacher.num_classes} classes, the model "
                         f"{card.path} has {card.params['num_classes']}")


def score(student: LogitsSet, teacher: LogitsSet | None, labels: Labels) -> Accumulator:
    """Accumulate every metric over the student's logits parts (part i = dataset shard i)."""
    acc = Accumulator(student.num_classes)
    for part in range(student.num_parts):
        table = student.read_part(part, columns=_COLUMNS)
        keys = table.column("key").to_pylist()
        ranked = fixed_list_to_numpy(table.column("topk_index"), student.topk).astype(np.int64)
        t_table = teacher.read_part(part, columns=_COLUMNS) if teacher is not None else None
        union = list(dict.fromkeys(keys + (t_table.column("key").to_pylist() if t_table is not None else [])))
        by_key = dict(zip(union, labels.for_keys(part, union)))
        acc.update_accuracy(np.array([by_key[k] for k in keys], dtype=np.int64), ranked)
        if t_table is not None:
            _teacher_batch(acc, table, ranked, t_table, by_key, teacher)
    return acc


def _teacher_batch(acc: Accumulator, table: pa.Table, ranked: np.ndarray, t_table: pa.Table, by_key: dict,
                   teacher: LogitsSet) -> None:
    n, classes = ranked.shape
    logits = np.empty((n, classes), dtype=np.float64)
    np.put_along_axis(logits, ranked, fixed_list_to_numpy(table.column("topk_logit"), classes), axis=1)
    t_keys = t_table.column("key").to_pylist()
    t_index = fixed_list_to_numpy(t_table.column("topk_index"), teacher.topk).astype(np.int64)
    t_logit = fixed_list_to_numpy(t_table.column("topk_logit"), teacher.topk)
    t_lse = t_table.column("lse").to_numpy()
    acc.update_teacher_accuracy(np.array([by_key[k] for k in t_keys], dtype=np.int64), t_index)
    position = {k: i for i, k in enumerate(t_keys)}
    mine = [i for i, k in enumerate(table.column("key").to_pylist()) if k in position]
    theirs = [position[k] for k in table.column("key").to_pylist() if k in position]
    acc.update_agreement(ranked[mine], logits[mine], t_index[theirs], t_logit[theirs], t_lse[theirs],
                         teacher.temperature)


def evaluate(model: str | Path, data: str | Path, out: str | Path, *,
             teacher_logits: str | Path | None = EvaluateOptions.teacher_logits,
             labels: str | Path | None = EvaluateOptions.labels, batch_size: int = EvaluateOptions.batch_size,
             device: str | None = EvaluateOptions.device, num_workers: int | None = EvaluateOptions.num_workers,
             threads: int = EvaluateOptions.threads) -> Path:
    """Evaluate a model (or teacher) card on a dataset and write the report in ``out``; return its manifest.

    Args:
        model: a model or teacher card (folder or manifest).
        data: the dataset manifest (labeled, or give ``labels``).
        out: output folder: ``logits/`` (the model's logits artifact), report files, ``manifest.json``.
        teacher_logits: a teacher's logits artifact of the same dataset: agreement, KL, teacher accuracy.
        labels: a Parquet of ``key,label`` (e.g. ``_hidden/unlabeled-labels.parquet``); overrides ``cls``.
        batch_size: images per forward pass of the logits stage.
        device: ``cpu``, ``cuda``... (default: CUDA when available).
        num_workers: decode workers of the logits stage.
        threads: CPU threads of the forward pass (0: torch's default).

    Raises:
        InputError / ManifestError: inputs that do not fit together, before any work.
    """
    card, dataset = mf.load(model), mf.load(data, kind="dataset")
    teacher = open_logits(teacher_logits) if teacher_logits is not None else None
    check_inputs(card, dataset, teacher)
    truth = Labels(dataset, labels, int(card.params["num_classes"]))
    if truth.source is None:
        log.warning("%s is unlabeled and no --labels were given: accuracy is not measured", dataset.path)
    out = Path(out)
    path = compute_logits(dataset.path, card.path, out / LOGITS_DIR, topk=int(card.params["num_classes"]),
                          temperature=1.0, logit_dtype="float32", batch_size=batch_size, device=device,
                          num_workers=num_workers, threads=threads)
    student = open_logits(path)
    acc = score(student, teacher, truth)
    return _write_evaluation(out, card, dataset, student, teacher, truth, acc)


def _write_evaluation(out: Path, card: mf.Manifest, dataset: mf.Manifest, student: LogitsSet,
                      teacher: LogitsSet | None, truth: Labels, acc: Accumulator) -> Path:
    names = list(card.params["class_names"])
    summary = acc.summary(names)
    report = {"model": {"id": card.id, "kind": card.kind, "arch": card.params["arch"]},
              "data": {"id": dataset.id, "samples": dataset.totals["samples"]},
              "teacher_logits": None if teacher is None else {"id": teacher.id, "teacher_id": teacher.teacher_id,
                                                               "topk": teacher.topk},
              "labels": truth.source, "temperature": teacher.temperature if teacher else None,
              "rows": student.manifest.totals["rows"],
              "failures": student.manifest.totals.get("failures", {}), "metrics": summary}
    files = {"report.json": report_json(report), "report.md": evaluation_markdown(report)}
    if summary["labeled"]:
        files.update({"confusion_matrix.csv": confusion_csv(acc.confusion, names),
                      "confusion_matrix.png": confusion_png(acc.confusion, names),
                      "per_class_accuracy.png": per_class_png(summary["per_class"])})
    inputs = [mf.input_ref(card, out, "model"), mf.input_ref(dataset, out, "data"),
              mf.input_ref(student.manifest, out, "logits")]
    if teacher is not None:
        inputs.append(mf.input_ref(teacher.manifest, out, "teacher_logits"))
    params = {"report": "evaluation", "model_id": card.id, "data_id": dataset.id, "labels": truth.source,
              "labels_sha256": sha256_file(truth.parquet) if truth.parquet else None,
              "temperature": report["temperature"], "top1": summary["top1"], "topk": summary["topk"], "k": summary["k"]}
    totals = {"samples": report["rows"], "rows": report["rows"], "classes": len(names),
              "failures": report["failures"]}
    return publish_report(out, files, stage="evaluate", params=params, totals=totals, inputs=inputs)


def pseudo_label_precision(selection: str | Path, labels: str | Path) -> dict:
    """The fraction of a selection's rows whose label is the true one (a DuckDB join with ``labels``).

    Args:
        selection: a selection manifest.
        labels: a Parquet of ``key,label`` (e.g. ``_hidden/unlabeled-labels.parquet``).

    Returns:
        ``{"rows", "known", "correct", "precision", "per_class": [...]}``; rows whose key has no true label
        count in ``rows`` but not in ``known``. Every row counts, balance copies and multi-label rows included.
    """
    sel = mf.load(selection, kind="selection")
    paths = [str(p) for p in SelectionRows(sel).paths]
    labels = Path(labels)
    _check_labels_file(labels)
    query = ("SELECT s.label, count(*), count(l.label), count(*) FILTER (WHERE s.label = l.label) "
             "FROM read_parquet(?) s LEFT JOIN read_parquet(?) l USING (key) GROUP BY s.label ORDER BY s.label")
    con = duckdb.connect()
    if con.execute("SELECT count(*) - count(DISTINCT key) FROM read_parquet(?)", [str(labels)]).fetchone()[0]:
        raise InputError(f"{labels}: a key appears more than once; one label per key")
    rows = con.execute(query, [paths, str(labels)]).fetchall()
    names = list(sel.params["class_names"])
    per_class = [{"class": int(c), "name": names[c], "rows": n, "known": k, "correct": ok,
                  "precision": ok / k if k else None} for c, n, k, ok in rows]
    total = {key: sum(c[key] for c in per_class) for key in ("rows", "known", "correct")}
    return {**total, "precision": total["correct"] / total["known"] if total["known"] else None,
            "per_class": per_class, "selection": {"id": sel.id, "path": str(sel.path)}}


def precision_report(selection: str | Path, labels: str | Path, out: str | Path) -> Path:
    """Write ``pseudo_label_precision`` as a report (JSON + Markdown + manifest) in ``out``."""
    result = pseudo_label_precision(selection, labels)
    sel = mf.load(selection, kind="selection")
    result["selection"] = {"id": sel.id}
    files = {"report.json": report_json(result), "report.md": precision_markdown(result)}
    params = {"report": "pseudo_label_precision", "selection_id": sel.id, "labels": Path(labels).name,
              "labels_sha256": sha256_file(labels),
              "precision": result["precision"]}
    totals = {"rows": result["rows"], "classes": len(sel.params["class_names"])}
    return publish_report(Path(out), files, stage="evaluate", params=params, totals=totals,
                          inputs=[mf.input_ref(sel, Path(out), "selection")])

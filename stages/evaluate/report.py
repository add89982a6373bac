"""Evaluation reports: JSON + Markdown + confusion matrix (CSV, PNG) + per-class plot, and the report manifest.

Every file is rendered in memory first (reports are small), so the manifest's id is known before anything
is written: a rerun with the same result keeps the existing report, a different result in the same folder
is refused instead of overwriting files another manifest lists. Files are published atomically.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from stages.artifacts.reports import new_figure, png_bytes


def report_json(report: dict) -> bytes:
    """Stable, human-readable JSON of a report."""
    return json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"


def confusion_csv(confusion: np.ndarray, class_names: list[str]) -> bytes:
    """Confusion matrix as CSV: header ``true\\predicted`` + class names, one row per true class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\predicted", *class_names])
    for name, row in zip(class_names, confusion):
        writer.writerow([name, *(int(v) for v in row)])
    return buffer.getvalue().encode()


def confusion_png(confusion: np.ndarray, class_names: list[str]) -> bytes:
    """Row-normalised confusion matrix heat map (counts written in the cells when there are <= 20 classes)."""
    n = len(class_names)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.4 * n, 20)
    fig = new_figure(figsize=(side, side))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 20:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    return png_bytes(fig)


def per_class_png(per_class: list[dict]) -> bytes:
    """Bar chart of per-class accuracy (classes without samples are left empty)."""
    fig = new_figure(figsize=(min(4 + 0.3 * len(per_class), 20), 3.5))
    ax = fig.add_subplot()
    values = [np.nan if c["accuracy"] is None else c["accuracy"] for c in per_class]
    ax.bar(range(len(values)), values, color="tab:blue")
    if len(per_class) <= 40:
        ax.set_xticks(range(len(values)), [c["name"] for c in per_class], rotation=90)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("per-class top-1 accuracy")
    fig.tight_layout()
    return png_bytes(fig)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def evaluation_markdown(report: dict) -> bytes:
    """The Markdown page of an evaluation report."""
    m = report["metrics"]
    lines = [f"# Evaluation of model `{report['model']['id'][:12]}` on dataset `{report['data']['id'][:12]}`", "",
             "| metric | value |", "| --- | --- |",
             f"| samples evaluated (rows) | {report['rows']} |", f"| with a known label | {m['labeled']} |",
             f"| failed samples (not evaluated) | {sum(report['failures'].values())} |",
             f"| top-1 accuracy | {_pct(m['top1'])} |", f"| top-{m['k']} accuracy | {_pct(m['topk'])} |",
             f"| mean per-class accuracy | {_pct(m['mean_per_class'])} |"]
    if "agreement" in m:
        a = m["agreement"]
        lines += [f"| teacher-student top-1 agreement | {_pct(a['top1'])} |",
                  f"| teacher top-1 in student top-{m['k']} | {_pct(a['topk'])} |",
                  f"| KL(teacher ‖ student) at T={report['temperature']} | {a['kl']:.4f} nats |"]
    if "teacher_labels" in m:
        t = m["teacher_labels"]
        lines += [f"| teacher's stored top-1 accuracy | {_pct(t['top1'])} |",
                  f"| teacher's stored top-{t['k']} accuracy | {_pct(t['topk'])} |"]
    lines += ["", "## Per class", "", "| class | samples | top-1 accuracy |", "| --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['samples']} | {_pct(c['accuracy'])} |" for c in m["per_class"]]
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![per-class accuracy](per_class_accuracy.png)",
              "", "Confusion matrix counts: `confusion_matrix.csv` (rows: true class, columns: predicted).", ""]
    return "\n".join(lines).encode()


def precision_markdown(report: dict) -> bytes:
    """The Markdown page of a pseudo-label precision report."""
    lines = [f"# Pseudo-label precision of selection `{report['selection']['id'][:12]}`", "",
             f"{report['correct']} of {report['known']} selected rows with a known true label carry it: "
             f"**{_pct(report['precision'])}** ({report['rows']} rows, {report['rows'] - report['known']} "
             "without a true label).", "", "| class | rows | known | correct | precision |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['rows']} | {c['known']} | {c['correct']} | {_pct(c['precision'])} |"
              for c in report["per_class"]]
    return "\n".join(lines + [""]).encode()

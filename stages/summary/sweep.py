"""The comparison report of a sweep: every evaluation of every variant, mean and spread over seeds.

Reads only finished artifacts: the evaluation reports (``report.json``, ``confusion_matrix.csv``), the
pseudo-label precision reports and the training runs' ``metrics.jsonl``. Writes one report folder:
``sweep.json`` (every run's numbers, and per row the mean and sample standard deviation), ``sweep.md`` (the
table, per-class accuracy, precision), ``confusion_matrices.png`` (one panel per row, side by side, counts
summed over seeds), ``training_curves.png`` (loss and training top-1 per epoch, mean over seeds, overlaid),
and a ``report`` manifest. The content is deterministic: a rerun of a finished sweep changes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import manifest as mf
from pipeline.errors import InputError
from stages.artifacts.reports import new_figure, png_bytes, publish_report
from stages.summary.stage import read_report

METRICS = ("top1", "top5", "mean_per_class", "agreement", "kl")


@dataclass(frozen=True)
class SweepRow:
    """One line of the table: an evaluation stage, for one variant (or shared by all: ``variant`` None)."""

    label: str
    variant: str | None
    stage: str
    evaluations: tuple[Path, ...]  # one evaluation (or precision) report folder per distinct run
    trainings: tuple[Path | None, ...] = ()  # the training folder of each run's model (curves)
    seeds: tuple[int | None, ...] = ()


def _numbers(folder: Path) -> dict:
    """One evaluation's metrics (fractions; KL in nats; None where not measured)."""
    m = read_report(folder)["metrics"]
    agreement = m.get("agreement") or {}
    return {"top1": m.get("top1"), "top5": m.get("topk"), "mean_per_class": m.get("mean_per_class"),
            "agreement": agreement.get("top1"), "kl": agreement.get("kl"),
            "per_class": [c["accuracy"] for c in m["per_class"]], "classes": [c["name"] for c in m["per_class"]]}


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of the measured values; sd None below two values."""
    got = [v for v in values if v is not None]
    if not got:
        return None, None
    return float(np.mean(got)), (float(np.std(got, ddof=1)) if len(got) > 1 else None)


def collect_row(row: SweepRow) -> dict:
    """A row's runs and their mean / spread."""
    runs = [{"folder": str(f), "seed": s, **_numbers(f)} for f, s in zip(row.evaluations, _seeds(row))]
    out = {"label": row.label, "variant": row.variant, "stage": row.stage, "n": len(runs), "runs": runs,
           "classes": runs[0]["classes"]}
    for key in METRICS:
        out[key], out[f"{key}_sd"] = mean_sd([r[key] for r in runs])
    per_class = [mean_sd([r["per_class"][c] for r in runs])[0] for c in range(len(out["classes"]))]
    out["per_class"] = per_class
    return out


def _seeds(row: SweepRow) -> tuple:
    return row.seeds if row.seeds else (None,) * len(row.evaluations)


def collect_precision(row: SweepRow) -> dict:
    """A pseudo-label precision row: per run precision and rows, mean and spread."""
    runs = [{"folder": str(f), "seed": s, "precision": (r := read_report(f))["precision"], "rows": r["rows"]}
            for f, s in zip(row.evaluations, _seeds(row))]
    mean, sd = mean_sd([r["precision"] for r in runs])
    return {"label": row.label, "variant": row.variant, "stage": row.stage, "n": len(runs), "runs": runs,
            "precision": mean, "precision_sd": sd}


def _pct(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def _kl(value: float | None, sd: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def _name(row: dict) -> str:
    return row["label"] if row["variant"] is None else f"{row['label']}, {row['variant']}"


def table(summary: dict) -> str:
    """The main table (what ``kdpipe sweep`` prints): one line per row, mean ± sd over its runs, in %."""
    lines = [("| model | variant | runs | test top-1 % | top-5 % | mean per-class % | agreement with teacher % | "
              "KL(teacher‖model) nats |"), "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["rows"]:
        lines.append(f"| {r['label']} | {r['variant'] or '(all)'} | {r['n']} | {_pct(r['top1'], r['top1_sd'])} | "
                     f"{_pct(r['top5'], r['top5_sd'])} | {_pct(r['mean_per_class'], r['mean_per_class_sd'])} | "
                     f"{_pct(r['agreement'], r['agreement_sd'])} | {_kl(r['kl'], r['kl_sd'])} |")
    for p in summary.get("precision", []):
        lines.append(f"| {p['label']} (pseudo-label precision) | {p['variant'] or '(all)'} | {p['n']} | "
                     f"{_pct(p['precision'], p['precision_sd'])} | | | | |")
    return "\n".join(lines)


def per_class_table(summary: dict) -> str:
    """Per-class top-1 accuracy (mean over runs, %), one line per row."""
    classes = summary["rows"][0]["classes"] if summary["rows"] else []
    lines = ["| model | variant | " + " | ".join(classes) + " |", "| --- | --- |" + " ---: |" * len(classes)]
    for r in summary["rows"]:
        lines.append(f"| {r['label']} | {r['variant'] or '(all)'} | " + " | ".join(_pct(a) for a in r["per_class"])
                     + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """The report page: title, source, the table, per-class accuracy, the figures."""
    head = [f"# {summary['title'] or 'Sweep of stage ' + summary['stage']}", ""]
    if summary.get("source"):
        head += [f"Source: {summary['source']}", ""]
    head += [(f"Swept stage `{summary['stage']}`; {summary['seeds']} seed(s) per variant; mean ± sample "
              "standard deviation over the runs of each row."), ""]
    body = [table(summary), "", "## Per-class top-1 accuracy (mean over runs, %)", "", per_class_table(summary), "",
            "![confusion matrices](confusion_matrices.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(head + body)


def _confusion(folder: Path) -> np.ndarray:
    path = Path(folder) / "confusion_matrix.csv"
    try:
        rows = list(csv.reader(io.StringIO(path.read_text())))
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc}); rerun that evaluation") from None
    return np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)


def confusion_png(rows: list[SweepRow], summary: dict) -> bytes:
    """Row-normalised confusion matrices, one panel per row (counts summed over its runs), side by side."""
    cols = min(4, max(1, len(rows)))
    nrows = math.ceil(len(rows) / cols)
    fig = new_figure(figsize=(3.2 * cols, 3.3 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_axis_off()
    for ax, row, info in zip(axes.flat, rows, summary["rows"]):
        counts = sum(_confusion(f) for f in row.evaluations)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{_name(info)}\ntop-1 {_pct(info['top1'])} %", fontsize=8)
        ax.set_xticks(range(len(info["classes"])), info["classes"], fontsize=6)
        ax.set_yticks(range(len(info["classes"])), info["classes"], fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def _history(folder: Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); rerun that training stage") from None


def curves_png(rows: list[SweepRow], summary: dict) -> bytes:
    """Training loss and training top-1 per epoch of each row's models (mean over runs), overlaid."""
    fig = new_figure(figsize=(11, 4))
    loss_ax, top_ax = fig.subplots(1, 2)
    seen = set()
    for row, info in zip(rows, summary["rows"]):
        folders = tuple(f for f in row.trainings if f is not None)
        if not folders or folders in seen:
            continue
        seen.add(folders)
        histories = [_history(f) for f in folders]
        epochs = min(len(h) for h in histories)
        loss = np.mean([[h[e]["train_loss"] for e in range(epochs)] for h in histories], axis=0)
        loss_ax.plot(range(epochs), loss, label=_name(info))
        tops = [[h[e].get("train_top1") for e in range(epochs)] for h in histories]
        if all(v is not None for t in tops for v in t):
            top_ax.plot(range(epochs), np.mean(tops, axis=0), label=_name(info))
    loss_ax.set(xlabel="epoch", ylabel="training loss (mean over runs)", yscale="log")
    top_ax.set(xlabel="epoch", ylabel="training top-1 (labeled samples)")
    loss_ax.legend(fontsize=6)
    fig.tight_layout()
    return png_bytes(fig)


def publish_sweep(out: Path, rows: list[SweepRow], *, precision: list[SweepRow] = (), meta: dict) -> tuple[Path, dict]:
    """Write the sweep's report folder ``out``; return its manifest path and the summary.

    Args:
        out: the report folder.
        rows: evaluation rows, in table order.
        precision: pseudo-label precision rows.
        meta: ``title``, ``source``, ``stage``, ``seeds``, ``variants`` and ``plan`` (recorded as they are).
    """
    if not rows:
        raise InputError(f"{out}: the sweep has no evaluation stage to compare (an evaluate stage with --model)")
    summary = {**meta, "rows": [collect_row(r) for r in rows], "precision": [collect_precision(p) for p in precision]}
    files = {"sweep.json": json.dumps(summary, indent=1, sort_keys=True).encode() + b"\n",
             "sweep.md": markdown(summary).encode(), "confusion_matrices.png": confusion_png(rows, summary),
             "training_curves.png": curves_png(rows, summary)}
    folders = dict.fromkeys(f for r in [*rows, *precision] for f in r.evaluations)
    inputs = [mf.input_ref(mf.load(f, kind="report"), out, role="evaluation") for f in folders]
    path = publish_report(out, files, stage="sweep", params={"report": "sweep", "stage": meta.get("stage")},
                          totals={"rows": len(rows)}, inputs=inputs)
    return path, summary

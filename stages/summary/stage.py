"""The comparison at the end of a chain: test top-1 of every trained model, pseudo-label precision, plots.

Reads only finished artifacts (evaluation and precision reports, the selection report, training metrics) and
publishes one report folder (``summary.json``, ``summary.md``, plots, a ``report`` manifest) whose content is
deterministic, so a rerun of a finished chain finds it complete and changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import manifest as mf
from pipeline.errors import InputError
from stages.artifacts.reports import new_figure, png_bytes, publish_report


@dataclass(frozen=True)
class Row:
    """One line of the table: a label, the evaluation folder it reads, and the training run it plots."""

    label: str
    evaluation: str
    training: str | None = None


def read_report(folder: Path) -> dict:
    """The ``report.json`` of a finished evaluation/precision folder (its manifest must load)."""
    manifest = mf.load(folder, kind="report")
    try:
        return json.loads((manifest.folder / "report.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}/report.json: unreadable ({exc}); rerun that stage") from None


def collect(run_dir: Path, rows: list[Row], precision: str | None) -> dict:
    """The summary dict: per row top-1 / top-5 / agreement with the teacher, and pseudo-label precision."""
    out = {"rows": []}
    for row in rows:
        metrics = read_report(run_dir / row.evaluation)["metrics"]
        agreement = metrics.get("agreement") or {}
        out["rows"].append({"label": row.label, "stage": row.evaluation, "top1": metrics.get("top1"),
                            "top5": metrics.get("topk"), "teacher_agreement": agreement.get("top1")})
    if precision:
        report = read_report(run_dir / precision)
        out["pseudo_label_precision"] = {"precision": report["precision"], "rows": report["rows"],
                                         "known": report["known"]}
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(summary: dict) -> str:
    """The summary as a Markdown table (what the demo prints)."""
    lines = ["| model | test top-1 % | test top-5 % | top-1 agreement with teacher % |", "| --- | ---: | ---: | ---: |"]
    for row in summary["rows"]:
        lines.append(f"| {row['label']} | {_pct(row['top1'])} | {_pct(row['top5'])} | "
                     f"{_pct(row['teacher_agreement'])} |")
    if "pseudo_label_precision" in summary:
        prec = summary["pseudo_label_precision"]
        lines.append(f"| pseudo-label precision (hidden labels, {prec['known']} rows) | "
                     f"{_pct(prec['precision'])} | | |")
    return "\n".join(lines)


def _curves_png(run_dir: Path, rows: list[Row]) -> bytes:
    """Training loss per epoch of every training run named by ``rows``."""
    fig = new_figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for row in (r for r in rows if r.training):
        lines = (run_dir / row.training / "metrics.jsonl").read_text().splitlines()
        history = [json.loads(line) for line in lines if line.strip()]
        ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], label=row.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def publish(run_dir: Path, out: Path, rows: list[Row], *, precision: str | None = None,
            copies: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Write the report folder ``out``; return its manifest path and the summary.

    Args:
        run_dir: the chain's run folder (stage folders inside).
        out: the report folder.
        rows: the table's rows, in order.
        precision: the folder of the pseudo-label precision report.
        copies: name in the report -> path (relative to ``run_dir``) of a plot made by a stage.
    """
    summary = collect(run_dir, rows, precision)
    files = {"summary.json": json.dumps(summary, indent=1, sort_keys=True).encode() + b"\n",
             "summary.md": (table(summary) + "\n").encode(), "training_curves.png": _curves_png(run_dir, rows)}
    for name, relative in (copies or {}).items():
        files[name] = (run_dir / relative).read_bytes()
    inputs = [mf.input_ref(mf.load(run_dir / r.evaluation), out, role=r.evaluation) for r in rows]
    path = publish_report(out, files, stage="summary", params={"report": "summary"},
                          totals={"rows": len(rows)}, inputs=inputs)
    return path, summary

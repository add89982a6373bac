"""``kdpipe demo``: the whole method on the bundled digits, on the CPU, in minutes, and its comparison table.

It is ``kdpipe run`` of the bundled config ``pipeline/cli/configs/demo.yaml`` (the same code paths as a cluster
run, so it is also the smoke test of the whole system), followed by a summary report. A rerun after an
interruption resumes: finished stages are verified and skipped.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

log = logging.getLogger("kdpipe")
CONFIG = "demo.yaml"
ROWS = [  # label, evaluation stage, training stage of the demo config
    ("supervised student (3 labels/class)", "eval_sup", "student_sup"),
    ("teacher (3 labels/class)", "eval_teacher", "teacher"),
    ("pseudo-label student, pretrained", "eval_pl", "student_pl"),
    ("pseudo-label student, fine-tuned", "eval_pl_ft", "student_pl_ft"),
    ("soft-target student, pretrained", "eval_soft", "student_soft"),
    ("soft-target student, fine-tuned", "eval_soft_ft", "student_soft_ft"),
]
COPIES = {"confusion_matrix_pl_ft.png": "eval_pl_ft/confusion_matrix.png",
          "selection_counts.png": "select/report/counts.png", "selection_scores.png": "select/report/scores.png"}


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole method on the bundled digits (CPU, minutes) and compare")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="run folder (default: demo-out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the bundled config, e.g. --set stages.student_pl.args.epochs=5")
    p.set_defaults(func=run)


def config_path() -> Path:
    """The bundled demo config (a file inside the installed package)."""
    return Path(str(resources.files("pipeline.cli").joinpath("configs", CONFIG)))


def run(args) -> int:
    from pipeline.cli.run import run_pipeline
    from pipeline.config import load_config
    from stages.summary.stage import Row, publish, table

    started = time.perf_counter()
    config = load_config(config_path(), [f"run_dir={args.out.resolve()}", *args.overrides])
    failed = [o for o in run_pipeline(config) if o.code]
    if failed:
        log.error("demo: stage %s failed (exit %d); fix it and rerun `kdpipe demo` to resume",
                  failed[0].name, failed[0].code)
        return failed[0].code
    rows = [Row(label, evaluation, training) for label, evaluation, training in ROWS]
    report, summary = publish(config.run_dir, config.run_dir / "report", rows, precision="precision",
                              copies=COPIES)
    print(table(summary))
    print(f"\nreport: {report.parent}   ({time.perf_counter() - started:.0f} s)")
    return 0

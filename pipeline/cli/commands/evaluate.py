"""``kdpipe evaluate``: a model on a dataset (accuracy, confusion, teacher agreement), or a selection's precision.

    kdpipe evaluate --model DIR --data M --out DIR [--teacher-logits M] [--labels PARQUET]
    kdpipe evaluate --selection M --labels PARQUET --out DIR      (pseudo-label precision)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy, confusion matrix, teacher agreement; "
                                        "or a selection's pseudo-label precision")
    p.add_argument("--model", default=None, help="model (or teacher) card folder or manifest")
    p.add_argument("--data", default=None, help="dataset manifest to evaluate on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--teacher-logits", default=None, help="teacher logits manifest of the same dataset")
    p.add_argument("--labels", default=None, help="Parquet of key,label (e.g. _hidden/unlabeled-labels.parquet)")
    p.add_argument("--selection", default=None,
                   help="selection manifest: report its pseudo-label precision against --labels instead")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--num-workers", type=int, default=None, help="decode workers of the logits stage")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.errors import InputError
    from stages.evaluate.stage import evaluate, precision_report

    if args.selection is not None:
        if args.labels is None or args.model or args.data:
            raise InputError("--selection needs --labels, and takes no --model/--data")
        path = precision_report(args.selection, args.labels, args.out)
        report = json.loads((path.parent / "report.json").read_text())
        print(f"pseudo-label precision: {_pct(report['precision'])} "
              f"({report['correct']}/{report['known']} rows with a known label)")
        return 0
    if args.model is None or args.data is None:
        raise InputError("evaluate needs --model and --data (or --selection with --labels)")
    path = evaluate(args.model, args.data, args.out, teacher_logits=args.teacher_logits, labels=args.labels,
                    batch_size=args.batch_size, device=args.device, num_workers=args.num_workers)
    metrics = json.loads((path.parent / "report.json").read_text())["metrics"]
    print(f"top-1 {_pct(metrics['top1'])}  top-{metrics['k']} {_pct(metrics['topk'])}  "
          f"({metrics['labeled']} labeled samples); report: {path.parent / 'report.md'}")
    return 0


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"

"""``kdpipe evaluate``: a model on a dataset (accuracy, confusion, teacher agreement), or a selection's precision.

    kdpipe evaluate --model DIR --data M --out DIR [--teacher-logits M] [--labels PARQUET]
    kdpipe evaluate --selection M --labels PARQUET --out DIR      (pseudo-label precision)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.options import add_options, as_kwargs, from_args
from stages.evaluate.options import EvaluateOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy, confusion matrix, teacher agreement; "
                                        "or a selection's pseudo-label precision")
    p.add_argument("--model", default=None, help="model (or teacher) card folder or manifest")
    p.add_argument("--data", default=None, help="dataset manifest to evaluate on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--selection", default=None,
                   help="selection manifest: report its pseudo-label precision against --labels instead")
    add_options(p, EvaluateOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.errors import InputError
    from stages.evaluate.stage import evaluate, precision_report

    opts = from_args(EvaluateOptions, args)
    if args.selection is not None:
        if opts.labels is None or args.model or args.data:
            raise InputError("--selection needs --labels, and takes no --model/--data")
        path = precision_report(args.selection, opts.labels, args.out)
        report = json.loads((path.parent / "report.json").read_text())
        print(f"pseudo-label precision: {_pct(report['precision'])} "
              f"({report['correct']}/{report['known']} rows with a known label)")
        return 0
    if args.model is None or args.data is None:
        raise InputError("evaluate needs --model and --data (or --selection with --labels)")
    path = evaluate(args.model, args.data, args.out, **as_kwargs(opts))
    metrics = json.loads((path.parent / "report.json").read_text())["metrics"]
    print(f"top-1 {_pct(metrics['top1'])}  top-{metrics['k']} {_pct(metrics['topk'])}  "
          f"({metrics['labeled']} labeled samples); report: {path.parent / 'report.md'}")
    return 0


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"

"""``kdpipe check_views --logits M --sample N``: re-run the teacher on rebuilt views of sampled logits rows.

Exits 0 when every checked row agrees with its stored top-K (up to the stored dtype), 1 otherwise,
printing a table of the rows that disagree (key, view, reason, largest logit difference).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.options import add_options, as_kwargs, from_args
from stages.logits.check_options import CheckViewsOptions

_SHOWN = 20


def register(sub) -> None:
    p = sub.add_parser("check_views", help="re-run the teacher on rebuilt views of sampled logits rows and "
                                           "compare with the stored top-K")
    p.add_argument("--logits", required=True, type=Path, help="logits manifest (file or folder)")
    add_options(p, CheckViewsOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.logits.check_views import check_views

    report = check_views(args.logits, **as_kwargs(from_args(CheckViewsOptions, args)))
    print(f"checked {report.checked} rows: {report.agreed} agree ({100.0 * report.agreement:.2f}%)")
    for m in report.mismatches[:_SHOWN]:
        diff = "-" if m["max_abs_diff"] is None else f"{m['max_abs_diff']:.3g}"
        print(f"  {m['key']}\tview {m['view']}\t{m['reason']}\tmax |dz| {diff}")
    if len(report.mismatches) > _SHOWN:
        print(f"  ... and {len(report.mismatches) - _SHOWN} more")
    return 0 if report.agreed == report.checked else 1

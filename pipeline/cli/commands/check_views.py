"""``kdpipe check_views --logits M --sample N``: re-run the teacher on rebuilt views of sampled logits rows.

Exits 0 when every checked row agrees with its stored top-K (up to the stored dtype), 1 otherwise,
printing a table of the rows that disagree (key, view, reason, largest logit difference).
"""

from __future__ import annotations

from pathlib import Path

_SHOWN = 20


def register(sub) -> None:
    p = sub.add_parser("check_views", help="re-run the teacher on rebuilt views of sampled logits rows and "
                                           "compare with the stored top-K")
    p.add_argument("--logits", required=True, type=Path, help="logits manifest (file or folder)")
    p.add_argument("--sample", type=int, default=256, help="rows to check, drawn uniformly (default 256)")
    p.add_argument("--data", type=Path, default=None, help="dataset manifest (default: the logits' input)")
    p.add_argument("--teacher", type=Path, default=None, help="teacher card (default: the logits' input)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    p.add_argument("--ulps", type=float, default=4.0,
                   help="tolerance in units of the stored logit dtype at the row's largest |logit| (>= 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.logits.check_views import check_views

    report = check_views(args.logits, args.sample, data=args.data, teacher=args.teacher, seed=args.seed,
                         ulps=args.ulps, batch_size=args.batch_size, device=args.device)
    print(f"checked {report.checked} rows: {report.agreed} agree ({100.0 * report.agreement:.2f}%)")
    for m in report.mismatches[:_SHOWN]:
        diff = "-" if m["max_abs_diff"] is None else f"{m['max_abs_diff']:.3g}"
        print(f"  {m['key']}\tview {m['view']}\t{m['reason']}\tmax |dz| {diff}")
    if len(report.mismatches) > _SHOWN:
        print(f"  ... and {len(report.mismatches) - _SHOWN} more")
    return 0 if report.agreed == report.checked else 1

"""``kdpipe show M``: what is in an artifact (kind, lineage, params, counts, first rows), for people who will not
read JSON."""

from __future__ import annotations

from pipeline.options import add_options, from_args
from stages.artifacts.describe import ShowOptions


def register(sub) -> None:
    p = sub.add_parser("show", help="print what is in an artifact: kind, lineage, params, counts, first rows")
    p.add_argument("manifest", help="any manifest (file or folder)")
    add_options(p, ShowOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.artifacts.describe import describe

    print("\n".join(describe(args.manifest, from_args(ShowOptions, args).rows)))
    return 0

"""``kdpipe status CONFIG|DIR [--json] [--verify]``: parts committed / total, failures, manifests, SLURM jobs."""

from __future__ import annotations

import json

from pipeline.cli.commands.common import out_location


def register(sub) -> None:
    p = sub.add_parser("status", help="what is done, running and failed, per stage and per part")
    p.add_argument("target", type=out_location, help="pipeline config, run folder, or one stage's output folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as given to run/submit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verify", action="store_true", help="re-hash every file of every manifest")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli.status import collect, format_table, to_json
    from stages.artifacts.checks import CHECKS

    checks = CHECKS if args.verify else None
    statuses = collect(args.target, args.overrides, verify_files=args.verify, checks=checks)
    print(json.dumps(to_json(statuses), indent=1) if args.json else format_table(statuses))
    return 0

"""``kdpipe verify MANIFEST``: checksums, row counts, schema; exits 1 naming every damaged file."""

from __future__ import annotations

import logging

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("verify", help="re-hash every file of a manifest, check counts and schema")
    p.add_argument("manifest")
    p.add_argument("--jobs", type=int, default=1, help="files checked in parallel (remote objects: 8-32)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.verify import verify
    from stages.artifacts.checks import CHECKS

    problems = verify(args.manifest, CHECKS, jobs=max(1, args.jobs))
    for problem in problems:
        log.error("verify: %s", problem)
    if not problems:
        log.info("verify: %s is intact", args.manifest)
    return 1 if problems else 0

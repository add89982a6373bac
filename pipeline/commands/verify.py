"""``kdpipe verify MANIFEST``: checksums, row counts, schema; exits 1 naming every damaged file."""

from __future__ import annotations

import logging

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("verify", help="re-hash every file of a manifest, check counts and schema")
    p.add_argument("manifest")
    p.set_defaults(func=run)


def content_checks() -> dict:
    """Kind-specific checks from the stages (only this entry module knows them)."""
    from pipeline.verify import count_check
    from stages.shardio import count_samples

    checks = {"dataset": count_check(count_samples, "samples", "samples")}
    try:
        from stages.checks import CHECKS  # added by later stages (logits, selection, ...)
        checks.update(CHECKS)
    except ImportError:
        pass
    return checks


def run(args) -> int:
    from pipeline.verify import verify

    problems = verify(args.manifest, content_checks())
    for problem in problems:
        log.error("verify: %s", problem)
    if not problems:
        log.info("verify: %s is intact", args.manifest)
    return 1 if problems else 0

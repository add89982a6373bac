"""``kdpipe submit CONFIG [--dry-run]``: the config's stages as chained SLURM jobs (scripts in the run folder)."""

from __future__ import annotations

import logging

from pipeline.cli.commands.run import add_config_args

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit the config's stages as SLURM array jobs chained by dependencies")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="write the sbatch scripts, submit nothing")
    p.add_argument("--all", action="store_true", help="submit complete stages too (they skip every part)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli.submit import sbatch_argv, submit
    from pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    jobs = submit(config, args.stages, dry_run=args.dry_run, skip_complete=not args.all)
    if not jobs:
        print("nothing to submit: every selected stage is complete")
    for job in jobs:
        shown = job.job_id or "(dry run) " + " ".join(sbatch_argv(job, {}))
        print(f"{job.stage:<16} {job.role:<9} {shown}")
    return 0

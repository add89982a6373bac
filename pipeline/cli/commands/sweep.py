"""``kdpipe sweep [CONFIG | --experiment NAME] [--stage S --vary key=v1,v2 ...] [--seeds N]``: a grid of variants
of one stage (and the stages that depend on it), run here or submitted to SLURM, and their comparison report.

With no ``--vary``, the config's ``x-sweep`` block says what to sweep (the bundled experiments carry one).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("kdpipe")


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [n for n in text.split(",") if n]


def register(sub) -> None:
    p = sub.add_parser("sweep", help="variants of one stage as a grid of runs (here or SLURM), then a comparison "
                                     "report (table, per-class accuracy, confusion matrices, curves)")
    p.add_argument("config", type=Path, nargs="?", default=None, help="pipeline config (YAML)")
    p.add_argument("--experiment", default=None, metavar="NAME",
                   help="a bundled experiment instead of CONFIG: alpha, temperature, consistency, blind, finetune")
    p.add_argument("--stage", default=None, help="the stage to sweep (default: the config's x-sweep.stage)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of an argument of --stage (or STAGE.arg of another stage); repeat for a grid; "
                        "a YAML list [a, 'b,c'] for values with commas")
    p.add_argument("--seeds", type=int, default=None, help="runs per variant, seeds +0..N-1 (default: x-sweep's, or 1)")
    p.add_argument("--seed-stages", default=None, metavar="A,B",
                   help="stages whose seed --seeds offsets (default: x-sweep's, or --stage)")
    p.add_argument("--evaluate", default=None, metavar="A,B",
                   help="evaluate stages to compare (default: x-sweep's, or every evaluate stage with --model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value before the sweep (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the config's run_dir)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="write RUN_DIR/sweep.yaml and print the plan only")
    mode.add_argument("--submit", action="store_true",
                      help="submit the sweep to SLURM; rerun without --submit once it is done for the report")
    p.add_argument("--subprocess", action="store_true", help="run each stage as a child process")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli.run import run_pipeline
    from pipeline.cli.submit import submit
    from pipeline.cli.sweep import PLAN_NAME, describe, experiment_path, plan_sweep
    from pipeline.cli.sweep_report import write_report
    from pipeline.errors import InputError
    from stages.summary.sweep import table

    if (args.config is None) == (args.experiment is None):
        raise InputError("kdpipe sweep: give a CONFIG file or --experiment NAME (one of them)")
    started = time.perf_counter()
    path = experiment_path(args.experiment) if args.experiment else args.config
    plan = plan_sweep(path, overrides=args.overrides, out=args.out, stage=args.stage, vary=args.vary,
                      seeds=args.seeds, seed_stages=_list(args.seed_stages), evaluate=_list(args.evaluate))
    print(describe(plan))
    if args.dry_run:
        return 0
    if args.submit:
        jobs = submit(plan.config)
        print(f"submitted {len(jobs)} job(s); `kdpipe status {plan.config.run_dir / PLAN_NAME}` follows them; "
              "rerun this command without --submit when they are done to write the report")
        return 0
    failed = [o for o in run_pipeline(plan.config, subprocess_mode=args.subprocess) if o.code]
    if failed:
        log.error("sweep: stage %s failed (exit %d); fix it and rerun the same command to resume",
                  failed[0].name, failed[0].code)
        return failed[0].code
    report, summary = write_report(plan)
    print(table(summary))
    print(f"\nreport: {report.parent}/sweep.md   ({time.perf_counter() - started:.0f} s)")
    return 0

"""``kdpipe run CONFIG [--stages a,b] [--set k=v]``: the config's stages in order on this machine."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("kdpipe")


def add_config_args(parser) -> None:
    """``CONFIG`` and ``--set key=value`` (repeatable), shared by run / submit."""
    parser.add_argument("config", type=Path, help="pipeline config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set stages.logits.args.topk=5 (repeatable)")
    parser.add_argument("--stages", nargs="+", default=None, help="only these stages (names, or a,b,c)")


def register(sub) -> None:
    p = sub.add_parser("run", help="run the config's stages in order here, skipping complete ones")
    add_config_args(p)
    p.add_argument("--subprocess", action="store_true", help="run each stage as a child process")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli.run import run_pipeline
    from pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    outcomes = run_pipeline(config, args.stages, subprocess_mode=args.subprocess)
    for outcome in outcomes:
        print(f"{outcome.name:<16} {outcome.status:<8} exit={outcome.code:<3} {outcome.seconds:8.1f} s")
    return next((o.code for o in outcomes if o.code), 0)

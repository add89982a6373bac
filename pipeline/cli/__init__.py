"""The entry layer: the ``kdpipe`` command line (``main(argv) -> int``), run / submit / status, templates, configs.

This subpackage is the only code that imports stage packages. Each ``pipeline/cli/commands/<name>.py`` defines
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``; a command imports its stage
inside ``func`` so that ``kdpipe --help`` (and every other command) does not load torch for it.
"""

from __future__ import annotations

import os

# Arrow's own pools (mimalloc/jemalloc) keep what a phase freed; through malloc, ``pipeline.memory`` returns it
# between phases (``kdpipe select`` of 2M images: peak RSS ~510 -> ~400 MiB with ``one_arena``). Arrow reads this
# once, at its first allocation: so it is set before pyarrow is imported, and only where the user did not choose.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import argparse  # noqa: E402  (after the pool choice above)
import logging  # noqa: E402
import sys  # noqa: E402

from pipeline import __version__  # noqa: E402
from pipeline.cli.commands import (
    check_views,
    dedup,
    demo,
    evaluate,
    export,
    index,
    ingest,
    logits,
    reshard,
    run,
    select,
    show,
    status,
    submit,
    sweep,
    teacher,
    train,
    verify,
)
from pipeline.cli.commands.common import refuse_remote_out
from pipeline.errors import KdpipeError, named_os_error
from pipeline.log import setup_logging
from pipeline.progress import INTERVAL_ENV

log = logging.getLogger("kdpipe")
COMMANDS = (ingest, index, teacher, logits, dedup, select, reshard, train, evaluate, run, submit, status, verify, demo,
            check_views, sweep, show, export)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="kdpipe", description="Offline teacher logits for distillation "
                                     "and billion-scale semi-supervised learning.")
    parser.add_argument("--version", action="version", version=f"kdpipe {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--progress-interval", type=float, metavar="S", help="seconds between progress lines "
                        f"when stderr is not a terminal (default: ${INTERVAL_ENV} or 30)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 some parts failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.progress_interval is not None:  # through the environment, so that child processes follow it
        os.environ[INTERVAL_ENV] = str(args.progress_interval)
    try:
        refuse_remote_out(args)
        return int(args.func(args) or 0)
    except KdpipeError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # read-only, no permission, no space, symlink loop: named, rc 2 (never a traceback)
        named = named_os_error(exc)
        if named is None:
            raise
        log.error("%s", named)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

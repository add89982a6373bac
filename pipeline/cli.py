"""The ``kdpipe`` command line: ``main(argv) -> int``, one subcommand module per stage in ``commands/``.

Each ``pipeline/commands/<name>.py`` defines ``register(subparsers)`` which adds its parser and sets
``func(args) -> int``. Stage code is imported inside ``func`` so that ``kdpipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from pipeline import __version__
from pipeline.errors import KdpipeError
from pipeline.log import setup_logging

log = logging.getLogger("kdpipe")
COMMANDS = ("ingest", "teacher", "logits", "dedup", "select", "reshard", "train", "evaluate",
            "run", "submit", "status", "verify", "demo", "check_views")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="kdpipe", description="Offline teacher logits for distillation "
                                     "and billion-scale semi-supervised learning.")
    parser.add_argument("--version", action="version", version=f"kdpipe {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = f"pipeline.commands.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 some parts failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KdpipeError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

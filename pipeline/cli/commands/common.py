"""What several subcommands share: the array-task flags (``TaskOptions``) and reading them back."""

from __future__ import annotations

import argparse

from pipeline.options import TaskOptions, add_options, from_args


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """``--task-index/--num-tasks`` (default: the SLURM array), ``--retry-failed``, finalize controls."""
    add_options(parser, TaskOptions, title="array tasks")


def task_options(args: argparse.Namespace) -> TaskOptions:
    """The ``TaskOptions`` given on the command line (defaults filled in)."""
    return from_args(TaskOptions, args)


def resolve_task(args: argparse.Namespace) -> tuple[int, int]:
    """The (index, count) pair from flags or SLURM variables."""
    return task_options(args).resolved()

"""What several subcommands share: the array-task flags (``TaskOptions``) and reading them back."""

from __future__ import annotations

import argparse

from pipeline.errors import StorageError
from pipeline.options import TaskOptions, add_options, from_args
from pipeline.storage import scheme_of


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """``--task-index/--num-tasks`` (default: the SLURM array), ``--retry-failed``, finalize controls."""
    add_options(parser, TaskOptions, title="array tasks")


def task_options(args: argparse.Namespace) -> TaskOptions:
    """The ``TaskOptions`` given on the command line (defaults filled in)."""
    return from_args(TaskOptions, args)


def resolve_task(args: argparse.Namespace) -> tuple[int, int]:
    """The (index, count) pair from flags or SLURM variables."""
    return task_options(args).resolved()


def refuse_remote_out(args: argparse.Namespace) -> None:
    """``--out s3://...`` (argparse's Path makes it ``s3:/...``) is refused by name before any work: stages write
    to a local or shared-filesystem folder; inputs may be remote (``kdpipe index``)."""
    out = getattr(args, "out", None)
    scheme = scheme_of(str(out)) if out is not None else None
    if scheme is not None:
        raise StorageError(f"--out {str(out).replace(':/', '://', 1)}: `kdpipe {args.command}` writes its parts to "
                           "a local or shared-filesystem folder, not to object storage; give a folder (a mounted "
                           "bucket works), then copy the finished folder if you need it in the bucket")

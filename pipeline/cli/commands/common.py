"""What several subcommands share: the array-task flags (``TaskOptions``) and reading them back."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import StorageError
from pipeline.options import TaskOptions, add_options, from_args
from pipeline.storage import classify, scheme_of


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """``--task-index/--num-tasks`` (default: the SLURM array), ``--retry-failed``, finalize controls."""
    add_options(parser, TaskOptions, title="array tasks")


def task_options(args: argparse.Namespace) -> TaskOptions:
    """The ``TaskOptions`` given on the command line (defaults filled in)."""
    return from_args(TaskOptions, args)


def resolve_task(args: argparse.Namespace) -> tuple[int, int]:
    """The (index, count) pair from flags or SLURM variables."""
    return task_options(args).resolved()


REMOTE_OUT_COMMANDS = ("index", "logits", "select", "reshard")  # commands whose --out may be an s3:// or gs:// prefix (pipeline.objstore)


def out_location(text: str) -> Path | str:
    """``--out``'s argparse type: a URL stays a string (``Path`` would turn ``s3://b/x`` into ``s3:/b/x``)."""
    return classify(text).target if scheme_of(text) is not None else Path(text)


def refuse_remote_out(args: argparse.Namespace) -> None:
    """``--out s3://...`` (argparse's Path makes it ``s3:/...``) is refused by name before any work, except by
    the commands that write object storage (``REMOTE_OUT_COMMANDS``, and only ``s3://``/``gs://`` there)."""
    out = getattr(args, "out", None)
    scheme = scheme_of(str(out)) if out is not None else None
    if scheme in ("s3", "gs", "gcs") and args.command in REMOTE_OUT_COMMANDS and isinstance(out, str):
        return
    if scheme is not None and args.command in REMOTE_OUT_COMMANDS:
        raise StorageError(f"--out {out}: `kdpipe {args.command}` writes to a folder or "
                           "an s3:// or gs:// prefix; http(s) is read-only")
    if scheme is not None:
        raise StorageError(f"--out {str(out).replace(':/', '://', 1)}: `kdpipe {args.command}` writes its parts to "
                           "a local or shared-filesystem folder, not to object storage; give a folder (a mounted "
                           "bucket works), then copy the finished folder if you need it in the bucket")

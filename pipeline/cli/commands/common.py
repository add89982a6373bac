"""Arguments shared by the array-task stages (task index/count, retries, finalize)."""

from __future__ import annotations

import argparse

from pipeline.planning import task_from_env


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """``--task-index/--num-tasks`` (default: the SLURM array), ``--retry-failed``, finalize controls."""
    group = parser.add_argument_group("array tasks")
    group.add_argument("--task-index", type=int, default=None,
                       help="this task's index (default: SLURM_ARRAY_TASK_ID, else 0)")
    group.add_argument("--num-tasks", type=int, default=None,
                       help="number of tasks (default: the SLURM array's size, else 1)")
    group.add_argument("--retry-failed", action="store_true",
                       help="retry parts (and samples) that failed before")
    group.add_argument("--max-attempts", type=int, default=3, help="give up on a part after this many failures")
    group.add_argument("--no-finalize", action="store_true",
                       help="do not write the manifest even if every part is committed")
    group.add_argument("--finalize", action="store_true", help="only write the manifest (no parts)")


def resolve_task(args: argparse.Namespace) -> tuple[int, int]:
    """The (index, count) pair from flags or SLURM variables."""
    return task_from_env(args.task_index, args.num_tasks)

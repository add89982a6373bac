"""Task planning: which contiguous block of parts an array task owns. Pure functions, no I/O."""

from __future__ import annotations

import os
from typing import Mapping

from pipeline.errors import InputError


def plan_block(task_index: int, num_tasks: int, num_parts: int) -> range:
    """Return the contiguous block of part indices that task ``task_index`` of ``num_tasks`` owns.

    Blocks differ in size by at most one, larger blocks first; with more tasks than parts the last tasks
    get an empty range. Every part belongs to exactly one task.
    """
    if num_tasks < 1:
        raise InputError(f"--num-tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise InputError(f"--task-index must be in [0, {num_tasks}), got {task_index}")
    if num_parts < 0:
        raise InputError(f"number of parts must be >= 0, got {num_parts}")
    base, extra = divmod(num_parts, num_tasks)
    start = task_index * base + min(task_index, extra)
    return range(start, start + base + (1 if task_index < extra else 0))


def task_from_env(task_index: int | None, num_tasks: int | None,
                  env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Resolve ``--task-index/--num-tasks``, defaulting to the SLURM array variables when set.

    SLURM array ids need not start at 0 (``--array=1-4``): the index is taken relative to
    ``SLURM_ARRAY_TASK_MIN``. Without flags and without SLURM, the whole stage is one task.
    """
    env = os.environ if env is None else env
    if task_index is None and "SLURM_ARRAY_TASK_ID" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - first
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in env:
        num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
    elif num_tasks is None and "SLURM_ARRAY_TASK_MAX" in env:
        num_tasks = int(env["SLURM_ARRAY_TASK_MAX"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")) + 1
    task_index = 0 if task_index is None else task_index
    num_tasks = 1 if num_tasks is None else num_tasks
    plan_block(task_index, num_tasks, 0)  # validates the pair
    return task_index, num_tasks

"""Task planning: the shard-to-task split is a pure function (table-driven)."""

import pytest

from pipeline.errors import InputError
from pipeline.planning import plan_block, task_from_env


@pytest.mark.parametrize("num_tasks, num_parts, blocks", [
    (1, 5, [range(0, 5)]),                                   # one task takes everything
    (2, 4, [range(0, 2), range(2, 4)]),                      # even split
    (3, 7, [range(0, 3), range(3, 5), range(5, 7)]),         # uneven: larger blocks first
    (4, 2, [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]),  # more tasks than parts
    (3, 0, [range(0, 0)] * 3),                               # nothing to do
    (5, 11, [range(0, 3), range(3, 5), range(5, 7), range(7, 9), range(9, 11)]),
])
def test_blocks_cover_every_part_once(num_tasks, num_parts, blocks):
    got = [plan_block(i, num_tasks, num_parts) for i in range(num_tasks)]
    assert got == blocks
    assert [p for b in got for p in b] == list(range(num_parts))


@pytest.mark.parametrize("index, count", [(-1, 2), (2, 2), (0, 0)])
def test_bad_task_numbers_are_named_errors(index, count):
    with pytest.raises(InputError, match="task"):
        plan_block(index, count, 10)


@pytest.mark.parametrize("env, flags, expected", [
    ({}, (None, None), (0, 1)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (None, None), (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}, (None, None), (4, 8)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (1, 2), (1, 2)),  # flags win
])
def test_task_defaults_come_from_slurm(env, flags, expected):
    assert task_from_env(*flags, env=env) == expected

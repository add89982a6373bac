"""Process-group set-up for training: one process, ``torchrun``, or SLURM tasks (``srun``).

Rank discovery: torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, else SLURM's ``SLURM_PROCID`` /
``SLURM_NTASKS`` / ``SLURM_LOCALID`` (then ``MASTER_ADDR`` defaults to 127.0.0.1 on a one-node job and
``MASTER_PORT`` to 29500), else a single process. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from pipeline.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank, and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu`` or ``cuda``; a rank uses GPU ``local_rank``."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(preference: str = "auto", env: Mapping[str, str] | None = None) -> DistEnv:
    """Discover the rank, pick the device and, for more than one process, join the process group."""
    env = os.environ if env is None else env
    rank, world, local_rank = discover(env)
    device = pick_device(preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in env:
            if int(env.get("SLURM_NNODES", "1")) > 1:
                raise InputError("multi-node SLURM training needs MASTER_ADDR (the first node's address) "
                                 "and MASTER_PORT exported in the job script")
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
        log.info("rank %d of %d joined the %s process group on %s", rank, world, backend, device)
    return DistEnv(rank, world, local_rank, device)


def teardown(env: DistEnv) -> None:
    """Leave the process group (if any)."""
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of ``values`` over every rank (identity on one process)."""
    if env.world == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.world > 1:
        dist.barrier()

"""Helpers of the SLURM and fault tests: configs for tiny chains, waiting for jobs, reading job states."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import yaml

from pipeline import manifest as mf
from pipeline.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, run_dir: Path, stages: dict, slurm: dict | None = None, env: dict | None = None) -> Path:
    """Write a config YAML whose commands run from this repository."""
    body = {"name": path.stem, "run_dir": str(run_dir), "workdir": str(REPO), "stages": stages,
            "slurm": {"time": "00:10:00", "signal_grace_s": 0, **(slurm or {})}, "env": env or {}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def digits_stage(array: int = 3, shard_size: int = 300) -> dict:
    """Ingest of the bundled digits into ceil(1797/shard_size) shards, as an array of ``array`` tasks."""
    return {"command": "ingest", "argv": ["digits"], "args": {"shard_size": shard_size}, "array": array}


def job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` fields of one job (array tasks: one line each; the last line wins)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    fields: dict[str, str] = {}
    for line in done.stdout.splitlines():
        for token in line.split():
            key, _, value = token.partition("=")
            fields[key] = value
    return fields


def array_states(job_id: str) -> list[str]:
    """JobState of every task of an array job (or of a plain job)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    return [t.split("=", 1)[1] for line in done.stdout.splitlines() for t in line.split()
            if t.startswith("JobState=")]


def wait_jobs(ids: list[str], timeout_s: float = 120) -> None:
    """Wait until none of ``ids`` is pending/running in squeue; raise with the queue on timeout."""
    stop = time.time() + timeout_s
    while time.time() < stop:
        done = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True)
        if done.returncode == 0 and not done.stdout.strip():
            return
        time.sleep(0.5)
    queue = subprocess.run(["squeue", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    jobs = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    raise TimeoutError(f"jobs {ids} still queued after {timeout_s} s:\n{queue}\n{jobs}")


def part_digests(folder: Path) -> dict[str, str]:
    """sha256 of every part file of a stage folder, by name."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob("part-*")) if p.is_file()}


def manifest_id(folder: Path) -> str:
    return mf.load(Path(folder) / mf.MANIFEST_NAME).id

"""``kdpipe submit CONFIG``: render one sbatch script per stage job, submit them chained by dependencies.

Per stage (``pipeline.config.Stage.mode``):

- ``array``: ``STAGE.sbatch`` runs ``kdpipe <cmd> ... <task_args>`` as ``--array=0-(N-1)%MAX``; each task finds
  its block of parts with ``plan_block`` from the SLURM array variables. ``STAGE.finalize.sbatch`` (one task,
  no GPU) runs ``kdpipe <cmd> ... <finalize_args>`` after the array (``afterok``) and writes the manifest.
- ``single``: one job running the command.
- ``torchrun``: one job of ``slurm.nodes`` nodes running ``srun torchrun --nproc-per-node=<gpus>``.

A stage's first job depends (``afterok``) on the last job of every stage it references (``${stage}``) or
``needs``. Every job has ``--requeue`` and ``--signal=B:USR1@<signal_grace_s>``; see the template in
``pipeline/templates/job.sbatch`` for the stop/requeue protocol. Scripts are written to ``RUN_DIR/slurm/``
and the job ids to ``RUN_DIR/jobs.json`` (read by ``kdpipe status``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from pipeline.atomic import write_atomic
from pipeline.cli.run import stage_problems
from pipeline.config import Config, Stage, stage_argv, stage_env, write_resolved, write_run_config
from pipeline.errors import InputError
from pipeline.signals import EXIT_REQUEUE
from pipeline.storage import RemotePath
from stages.artifacts.checks import CHECKS

log = logging.getLogger(__name__)
JOBS_NAME = "jobs.json"
_SAFE_DIRECTIVE = re.compile(r"[A-Za-z0-9_.:,=/@%+\-]+")
_SAFE_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Job:
    """One sbatch script: which stage, which role (``tasks``, ``finalize``, ``single``, ``torchrun``)."""

    stage: str
    role: str
    script: Path
    after: list[str] = field(default_factory=list)  # "stage:role" keys of the jobs it waits for
    job_id: str | None = None

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.role}"


def directive(flag: str, value: object) -> str:
    """One ``#SBATCH --flag=value`` line; values with characters outside a safe set are refused."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise InputError(f"slurm setting {flag}={text!r}: newlines are not allowed in #SBATCH directives")
    if not _SAFE_DIRECTIVE.fullmatch(text):
        raise InputError(f"slurm setting {flag}={text!r}: only letters, digits and _.:,=/@%+- are allowed "
                         "in #SBATCH values (rename the folder or value)")
    return f"#SBATCH --{flag}={text}"


def directives(config: Config, stage: Stage, role: str) -> list[str]:
    """The ``#SBATCH`` lines of one job, every value from the config."""
    s = stage.slurm
    suffix = "" if role in ("tasks", "single", "torchrun") else f"-{role}"
    log_name = f"{stage.name}{suffix}-%A_%a.out" if role == "tasks" else f"{stage.name}{suffix}-%j.out"
    lines = [directive("job-name", f"kdpipe-{config.name}-{stage.name}{suffix}"),
             directive("output", config.run_dir / "logs" / log_name), directive("open-mode", "append")]
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if s.get(key):
            lines.append(directive(key, s[key]))
    time_limit = s.get("finalize_time") if role == "finalize" and s.get("finalize_time") else s.get("time")
    if time_limit:
        lines.append(directive("time", time_limit))
    lines += _resource_lines(s, role)
    if role == "tasks":
        spec = f"0-{stage.array - 1}" + (f"%{s['max_parallel']}" if s.get("max_parallel") else "")
        lines.append(directive("array", spec))
    if s.get("requeue", True):
        lines.append("#SBATCH --requeue")
    if s.get("signal_grace_s"):
        lines.append(directive("signal", f"B:USR1@{int(s['signal_grace_s'])}"))
    for extra in s.get("extra_directives", []):
        flag, _, value = extra.lstrip("-").partition("=")
        lines.append(directive(flag, value) if value else directive(flag, "").rstrip("="))
    return lines


def _resource_lines(s: dict, role: str) -> list[str]:
    gpus = int(s.get("gpus") or 0) if role != "finalize" else 0
    cpus = int(s.get("cpus_per_task") or 1) if role != "finalize" else 1
    if role == "torchrun":
        lines = [directive("nodes", int(s.get("nodes") or 1)), directive("ntasks-per-node", 1),
                 directive("cpus-per-task", cpus)]
        return lines + ([directive("gpus-per-node", gpus)] if gpus else [])
    return [directive("cpus-per-task", cpus)] + ([directive("gres", f"gpu:{gpus}")] if gpus else [])


def launch_line(config: Config, stage: Stage, role: str) -> str:
    """The shell command that runs kdpipe in the job (every word shell-quoted)."""
    extra = {"finalize": stage.finalize_args, "tasks": stage.task_args, "single": []}
    if role in extra:
        return shlex.join([config.python, "-m", stage.entry, *stage_argv(stage, extra[role])])
    nproc = max(1, int(stage.slurm.get("gpus") or 0))
    port = int(stage.slurm.get("master_port", 29500))
    head = 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
    return (head + "srun --kill-on-bad-exit=1 " + shlex.join([config.python, "-m", "torch.distributed.run"])
            + ' --nnodes="$SLURM_JOB_NUM_NODES" --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d'
            + f' --rdzv-endpoint="$head_node:{port}" --nproc-per-node={nproc} '
            + shlex.join(["-m", stage.entry, *stage_argv(stage)]))


def render(config: Config, stage: Stage, role: str) -> str:
    """The full sbatch script of one job of ``stage``."""
    env = stage_env(config, stage)
    bad = sorted(k for k in env if not _SAFE_ENV_KEY.fullmatch(k))
    if bad:
        raise InputError(f"{config.source or 'config'}: stage {stage.name}: env variable name {bad[0]!r} is not a "
                         "valid shell identifier (letters, digits, _; no leading digit); rename it in env")
    exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    values = {
        "role": role, "stage": stage.name, "config_name": config.name, "config_hash": config.hash[:12],
        "directives": "\n".join(directives(config, stage, role)),
        "preamble": (stage.slurm.get("preamble") or "").rstrip("\n"),
        "workdir": shlex.quote(str(config.workdir)), "exports": "\n".join(exports),
        "launch": launch_line(config, stage, role), "exit_requeue": str(EXIT_REQUEUE),
    }
    template = resources.files("pipeline.cli").joinpath("templates/job.sbatch").read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def plan_jobs(config: Config, stages: list[Stage]) -> list[Job]:
    """The jobs of ``stages`` (in order) with their dependencies on the jobs of earlier stages."""
    folder = config.run_dir / "slurm"
    last: dict[str, str] = {}
    jobs: list[Job] = []
    for stage in stages:
        after = [last[n] for n in stage.needs if n in last]
        roles = {"array": ["tasks", "finalize"], "torchrun": ["torchrun"]}.get(stage.mode, ["single"])
        for role in roles:
            name = f"{stage.name}.sbatch" if role != "finalize" else f"{stage.name}.finalize.sbatch"
            job = Job(stage.name, role, folder / name, after)
            jobs.append(job)
            after = [job.key]
        last[stage.name] = jobs[-1].key
    return jobs


def write_scripts(config: Config, stages: list[Stage], jobs: list[Job]) -> None:
    """Write every job's script (executable, atomically) and the resolved config beside the outputs."""
    by_name = {s.name: s for s in stages}
    write_run_config(config)
    (config.run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch fails a job whose log folder is missing
    for job in jobs:
        stage = by_name[job.stage]
        write_atomic(job.script, render(config, stage, job.role).encode())
        job.script.chmod(0o755)
        if stage.out is not None:
            write_resolved(config, stage.out)


def sbatch_argv(job: Job, ids: dict[str, str]) -> list[str]:
    """``sbatch --parsable [--dependency=afterok:...] SCRIPT`` for ``job`` given the ids submitted so far."""
    argv = ["sbatch", "--parsable"]
    deps = [ids[key] for key in job.after if key in ids]
    if deps:
        argv.append("--dependency=afterok:" + ":".join(deps))
    return argv + [str(job.script)]


def submit_jobs(jobs: list[Job], runner: Callable[[list[str]], str] | None = None) -> dict[str, str]:
    """Submit ``jobs`` in order; return their ids by ``stage:role`` key."""
    runner = runner or _sbatch
    ids: dict[str, str] = {}
    for job in jobs:
        out = runner(sbatch_argv(job, ids)).strip()
        job.job_id = out.split(";", 1)[0]
        if not job.job_id.isdigit():
            raise InputError(f"sbatch returned {out!r} for {job.script}, not a job id")
        ids[job.key] = job.job_id
        log.info("submitted %s as job %s", job.script.name, job.job_id)
    return ids


def _sbatch(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise InputError("sbatch not found: is this a SLURM login node? (use --dry-run to only write scripts)") from None
    if done.returncode != 0:
        raise InputError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def record_submission(config: Config, jobs: list[Job]) -> Path:
    """Append this submission's job ids to ``RUN_DIR/jobs.json`` (the latest is last)."""
    path = config.run_dir / JOBS_NAME
    history = load_submissions(config.run_dir)
    history.append({"time": time.time(), "config_hash": config.hash,
                    "jobs": [{"stage": j.stage, "role": j.role, "job_id": j.job_id, "script": str(j.script),
                              "after": j.after} for j in jobs]})
    write_atomic(path, json.dumps({"submissions": history}, indent=1).encode())
    return path


def load_submissions(run_dir: Path) -> list[dict]:
    """Every recorded submission of a run folder, oldest first (empty when none)."""
    try:
        return list(json.loads((Path(run_dir) / JOBS_NAME).read_bytes())["submissions"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def submit(config: Config, names: list[str] | None = None, *, dry_run: bool = False,
           skip_complete: bool = True, runner: Callable[[list[str]], str] | None = None) -> list[Job]:
    """Render (and unless ``dry_run`` submit) the jobs of the selected stages.

    Args:
        config: the resolved config.
        names: stages to submit (default all), in config order.
        dry_run: write the scripts only.
        skip_complete: leave out stages whose manifests exist and verify.
        runner: runs an sbatch argv and returns its stdout (tests; default ``subprocess``).
    """
    if isinstance(config.run_dir, RemotePath):
        raise InputError(f"run_dir {config.run_dir}: `kdpipe submit` writes sbatch scripts, logs and jobs.json "
                         "into run_dir, which must be a shared folder; keep run_dir on disk and give the stages "
                         "an s3:// or gs:// out (out: s3://bucket/run/logits)")
    checks = CHECKS
    complete: dict[str, bool] = {}  # verified once per stage: a check re-hashes every file of the stage

    def is_complete(stage: Stage) -> bool:
        if stage.name not in complete:
            complete[stage.name] = bool(stage.outputs) and not stage_problems(stage, checks)
        return complete[stage.name]

    stages = [s for s in config.select(names) if not (skip_complete and is_complete(s))]
    _check_needs(config, stages, is_complete)
    jobs = plan_jobs(config, stages)
    write_scripts(config, stages, jobs)
    if not dry_run and jobs:
        submit_jobs(jobs, runner)
        record_submission(config, jobs)
    return jobs


def _check_needs(config: Config, stages: list[Stage], is_complete: Callable[[Stage], bool]) -> None:
    """Refuse a stage whose needed stage is neither complete nor submitted with it."""
    chosen = {s.name for s in stages}
    for stage in stages:
        for need in stage.needs:
            if need not in chosen and not is_complete(config.stages[need]):
                raise InputError(f"stage {stage.name} needs {need}, which is not complete and not submitted "
                                 f"now; add it to --stages or run it first")

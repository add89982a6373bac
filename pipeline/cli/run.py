"""``kdpipe run CONFIG``: the config's stages in order on this machine, skipping what is complete.

A stage is complete when every manifest it makes exists and verifies (``pipeline.verify``: schema, id, sizes,
sha256, counts). Otherwise its command line (``pipeline.config.stage_argv``) runs as one task over all parts
(``--task-index 0 --num-tasks 1``): committed parts are skipped, so an interrupted stage resumes part by part.
If the task leaves the manifest unwritten, the stage's finalize command runs. Stages run in this process
(``cli.main``, or ``main`` of the stage's ``entry`` module) or, with ``subprocess=True``, as
``python -m pipeline ...`` child processes.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import Config, Stage, stage_argv, stage_env, write_resolved, write_run_config
from pipeline.errors import IntegrityError, KdpipeError
from pipeline.signals import EXIT_REQUEUE
from pipeline.verify import verify
from stages.artifacts.checks import CHECKS

log = logging.getLogger(__name__)
LOCAL_TASK = ["--task-index", "0", "--num-tasks", "1"]


@dataclass
class StageOutcome:
    """What ``run`` did with one stage: ``skipped`` (complete), ``done``, ``failed`` or ``stopped``."""

    name: str
    status: str
    code: int = 0
    seconds: float = 0.0


def stage_problems(stage: Stage, checks: dict | None = None) -> list[str]:
    """Why ``stage`` is not complete: missing or damaged manifests/files (empty when complete)."""
    if not stage.outputs:
        return [f"stage {stage.name} has no output folder; it always runs"]
    problems: list[str] = []
    for path in stage.manifests:
        if not path.is_file():
            problems.append(f"{path}: no manifest yet")
        else:
            problems += verify(path, checks)
    return problems


def run_pipeline(config: Config, names: list[str] | None = None, *, subprocess_mode: bool = False,
                 checks: dict | None = None) -> list[StageOutcome]:
    """Run the selected stages in config order; stop at the first stage that does not complete.

    Args:
        config: the resolved config.
        names: stage names to run (default: all), in config order.
        subprocess_mode: run each command as a child ``python -m pipeline`` process.
        checks: verification checks (default: ``stages.artifacts.checks.CHECKS``).

    Returns:
        One outcome per stage attempted; the last one is ``failed``/``stopped`` when the chain broke.
    """
    checks = CHECKS if checks is None else checks
    write_run_config(config)
    outcomes = []
    for stage in config.select(names):
        outcome = run_stage(config, stage, subprocess_mode=subprocess_mode, checks=checks)
        outcomes.append(outcome)
        if outcome.status in ("failed", "stopped"):
            break
    return outcomes


def run_stage(config: Config, stage: Stage, *, subprocess_mode: bool = False,
              checks: dict | None = None) -> StageOutcome:
    """Run one stage to completion (or skip it when complete); see ``run_pipeline``."""
    started = time.time()
    if stage.outputs and not stage_problems(stage, checks):
        log.info("stage %s: complete and verified, skipped", stage.name)
        return StageOutcome(stage.name, "skipped")
    if stage.out is not None:
        write_resolved(config, stage.out)
    local = LOCAL_TASK if stage.mode == "array" else []
    code = invoke(config, stage, stage_argv(stage, local), subprocess_mode)
    if code == 0 and stage.finalize_args and any(not p.is_file() for p in stage.manifests):
        code = invoke(config, stage, stage_argv(stage, stage.finalize_args), subprocess_mode)
    seconds = round(time.time() - started, 3)
    if code != 0:
        status = "stopped" if code == EXIT_REQUEUE else "failed"
        log.error("stage %s: %s with exit code %d", stage.name, status, code)
        return StageOutcome(stage.name, status, code, seconds)
    problems = stage_problems(stage, checks) if stage.outputs else []
    if problems:
        raise IntegrityError(f"stage {stage.name} exited 0 but is not complete: {'; '.join(problems[:5])}")
    log.info("stage %s: done in %.1f s", stage.name, seconds)
    return StageOutcome(stage.name, "done", 0, seconds)


def invoke(config: Config, stage: Stage, argv: list[str], subprocess_mode: bool) -> int:
    """Run ``kdpipe <argv>`` with the stage's environment; return its exit code."""
    env = stage_env(config, stage)
    log.info("stage %s: kdpipe %s", stage.name, " ".join(argv))
    if subprocess_mode:
        cmd = [config.python, "-m", stage.entry, *argv]
        return subprocess.run(cmd, cwd=config.workdir, env={**os.environ, **env}, check=False).returncode
    main = importlib.import_module("pipeline.cli" if stage.entry == "pipeline" else stage.entry).main
    if stage.entry == "pipeline":  # keep the caller's --log-level (cli.main sets the root level)
        argv = ["--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()), *argv]
    with _environment(env), _cwd(config.workdir):
        try:
            return int(main(argv) or 0)
        except SystemExit as exc:  # StopForRequeue, or argparse rejecting the stage's flags
            return exc.code if isinstance(exc.code, int) else 2
        except KdpipeError as exc:
            log.error("stage %s: %s", stage.name, exc)
            return 2


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    if folder != before:
        os.chdir(folder)
    try:
        yield
    finally:
        if Path.cwd() != before:
            os.chdir(before)

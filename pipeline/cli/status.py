"""``kdpipe status CONFIG|DIR``: what is done, failed and running, per stage and per part.

Per output folder: parts committed / total (one scandir of ``_parts``: receipts, failure records and the plan
``_plan.json``; the total comes from the plan or the manifest), failed parts with reason, message and attempts,
and the manifest (missing, valid, or fully re-hashed with ``verify=True``). Per stage: the SLURM state of the
jobs ``kdpipe submit`` recorded in ``RUN_DIR/jobs.json``, from ``squeue`` (live) and ``scontrol show job``
(recently finished), when those commands exist. Per folder with receipts: samples, samples/s and, while parts
are missing, an ETA (``pipeline.progress.throughput``: from the receipts' seconds and finish times).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pipeline import manifest as mf
from pipeline.cli.submit import load_submissions
from pipeline.config import RESOLVED_NAME, Config, Stage, load_config, load_resolved, location
from pipeline.errors import KdpipeError
from pipeline.objstore import scan_prefix
from pipeline.parts import RECEIPTS, part_name, scan_folder
from pipeline.progress import format_eta, throughput
from pipeline.storage import RemotePath
from pipeline.verify import verify

Runner = Callable[[list[str]], str]


@dataclass
class FolderStatus:
    """One output folder: committed parts, total, failures, manifest state."""

    path: str
    committed: int = 0
    total: int | None = None
    failed: dict[int, dict] = field(default_factory=dict)
    manifest: str = "missing"
    manifest_id: str | None = None
    problems: list[str] = field(default_factory=list)
    has_parts: bool = True  # False for stages that write no parts (teacher, train, evaluate)
    throughput: dict | None = None  # samples, samples/s, ETA from the receipts (pipeline.progress.throughput)


@dataclass
class StageStatus:
    """One stage: its folders and its SLURM jobs (role, id, task states)."""

    name: str
    command: str
    mode: str
    folders: list[FolderStatus] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)

    @property
    def state(self) -> str:
        """``complete``, ``failed`` (some part gave up or failed), ``partial``, ``not started`` or ``no output``."""
        if not self.folders:
            return "no output"
        if all(f.manifest in ("ok", "verified") for f in self.folders):
            return "complete"
        if any(f.failed or f.manifest == "damaged" for f in self.folders):
            return "failed"
        return "partial" if any(f.committed for f in self.folders) else "not started"


def folder_status(folder: Path, verify_files: bool = False, checks: dict | None = None) -> FolderStatus:
    """Status of one stage output folder from one scan of its receipts and its manifest."""
    folder = folder if isinstance(folder, RemotePath) else location(str(folder))
    remote = isinstance(folder, RemotePath)
    scan = scan_prefix(str(folder)) if remote else scan_folder(folder)
    has_parts = bool(scan.receipts or scan.failures or scan.plan) if remote else (folder / RECEIPTS).is_dir()
    status = FolderStatus(str(folder), committed=len(scan.receipts), has_parts=has_parts,
                          failed={i: {k: r.get(k) for k in ("reason", "message", "attempts")}
                                  for i, r in sorted(scan.failures.items())})
    if scan.plan and isinstance(scan.plan.get("num_parts"), int):
        status.total = scan.plan["num_parts"]
    manifest_path = folder / mf.MANIFEST_NAME
    if manifest_path.is_file():
        _manifest_state(status, manifest_path, verify_files, checks)
    if scan.receipts:
        timed = [(r, r.get("finished_at") if isinstance(r.get("finished_at"), (int, float)) else None)
                 for r in scan.receipts.values()]
        status.throughput = throughput(timed, status.total)
    return status


def _manifest_state(status: FolderStatus, path: Path, verify_files: bool, checks: dict | None) -> None:
    try:
        manifest = mf.load(path)
    except KdpipeError as exc:
        status.manifest, status.problems = "damaged", [str(exc)]
        return
    status.manifest, status.manifest_id = "ok", manifest.id
    status.total = len(manifest.files) if status.total is None else status.total
    if verify_files:
        status.problems = verify(path, checks)
        status.manifest = "damaged" if status.problems else "verified"


def slurm_states(job_ids: list[str], runner: Runner | None = None) -> dict[str, Counter]:
    """Task states by job id: live ones from ``squeue -r``, finished ones from ``scontrol show job``."""
    runner = runner or _run
    states: dict[str, Counter] = {j: Counter() for j in job_ids}
    if not job_ids or shutil.which("squeue") is None and runner is _run:
        return states
    for line in runner(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)]).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].split("_")[0] in states:
            states[parts[0].split("_")[0]][parts[1]] += 1
    for job_id in (j for j in job_ids if not states[j]):
        text = runner(["scontrol", "show", "job", "-o", job_id])
        for token in text.split():
            if token.startswith("JobState="):
                states[job_id][token.split("=", 1)[1]] += 1
        if not states[job_id]:
            states[job_id]["UNKNOWN"] += 1  # finished long ago (purged), or another cluster
    return states


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def stage_status(stage: Stage, jobs: list[dict], states: dict[str, Counter], verify_files: bool = False,
                 checks: dict | None = None) -> StageStatus:
    """Status of one configured stage given its recorded jobs and their SLURM states."""
    status = StageStatus(stage.name, stage.command, stage.mode)
    status.folders = [folder_status(f, verify_files, checks) for f in stage.outputs]
    for job in jobs:
        counts = states.get(job["job_id"], Counter())
        status.jobs.append({"role": job["role"], "job_id": job["job_id"], "states": dict(sorted(counts.items()))})
    return status


def collect(target: Path, overrides: list[str] | None = None, *, verify_files: bool = False,
            runner: Runner | None = None, checks: dict | None = None) -> list[StageStatus]:
    """Status of a config file, a run folder (``config.resolved.json``) or one stage output folder."""
    target = location(str(target))
    remote = isinstance(target, RemotePath)  # an s3:// or gs:// prefix: a run folder or a stage output there
    is_run = (target / RESOLVED_NAME).is_file()
    if not is_run and (remote or target.is_dir()):
        parts = scan_prefix(str(target)).receipts if remote else (target / RECEIPTS).is_dir()
        if not parts and not (target / mf.MANIFEST_NAME).is_file():
            raise KdpipeError(f"{target}: neither a run folder ({RESOLVED_NAME}) nor a stage output folder "
                              f"({RECEIPTS}/ or {mf.MANIFEST_NAME}); give the config file or the run folder")
        stage = StageStatus(target.name, "?", "?", [folder_status(target, verify_files, checks)])
        return [stage]
    config: Config = load_resolved(target) if is_run else load_config(target, overrides or [])
    submissions = load_submissions(config.run_dir)
    latest = submissions[-1]["jobs"] if submissions else []
    states = slurm_states([j["job_id"] for j in latest if j.get("job_id")], runner)
    return [stage_status(s, [j for j in latest if j["stage"] == s.name], states, verify_files, checks)
            for s in config.stages.values()]


def to_json(statuses: list[StageStatus]) -> list[dict]:
    """JSON-ready status (``kdpipe status --json``)."""
    return [{**asdict(s), "state": s.state} for s in statuses]


def format_table(statuses: list[StageStatus]) -> str:
    """A human table: one line per output folder, then failed parts and SLURM jobs."""
    lines = [f"{'stage':<14} {'state':<12} {'parts':>11}  {'manifest':<9} {'id':<12} folder"]
    for stage in statuses:
        for folder in stage.folders or [FolderStatus("-", manifest="-")]:
            total = folder.total if folder.total is not None else "?"
            parts = f"{folder.committed}/{total}" if stage.folders and folder.has_parts else "-"
            lines.append(f"{stage.name:<14} {stage.state:<12} {parts:>11}  {folder.manifest:<9} "
                         f"{(folder.manifest_id or '')[:12]:<12} {folder.path}")
            for index, fail in folder.failed.items():
                lines.append(f"    {part_name(index)} FAILED x{fail.get('attempts')} "
                             f"({fail.get('reason')}): {fail.get('message')}")
            lines += [f"    problem: {p}" for p in folder.problems[:5]]
            lines += [_throughput_line(folder.throughput)] if folder.throughput else []
        for job in stage.jobs:
            shown = " ".join(f"{k}:{v}" for k, v in job["states"].items()) or "-"
            lines.append(f"    slurm {job['role']:<9} job {job['job_id']:<10} {shown}")
    return "\n".join(lines)


def _throughput_line(figures: dict) -> str:
    """``    throughput: 1234 samples, 56.7 samples/s (28.4 per task), busy 0:00:21, ETA 0:01:05``."""
    rate, per_task = figures["samples_per_s"], figures["part_samples_per_s"]
    line = (f"    throughput: {figures['samples']} samples, {'?' if rate is None else rate} samples/s "
            f"({'?' if per_task is None else per_task} per task), busy {format_eta(figures['busy_seconds'])}")
    return line + (f", ETA {format_eta(figures['eta_s'])}" if figures["eta_s"] is not None else "")

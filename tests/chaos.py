"""Chaos harness helpers: SIGKILL a whole ``kdpipe`` command at a seeded instant, rerun it plainly, and compare
the run folder file by file with a clean run (every manifest's id, every listed file's sha256).

Used by ``tests/test_chaos.py`` (a few kills by default, more under ``-m slow``) and ``scripts/chaos_demo.py``
(30 seeded kills of the demo). A kill takes the command's whole process group (the command and any child it
started), the way a node failure or ``scancel --signal=KILL`` would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = ("_config",)  # the resolved config copies: written by every run, no artifact content
# A faster demo: the same stages and code paths, fewer epochs (tests/test_demo.py's SHORT, fewer teacher epochs).
QUICK_DEMO = ["stages.teacher.args.epochs=10", "stages.student_pl.args.epochs=2", "stages.student_pl_ft.args.epochs=2",
              "stages.student_sup.args.epochs=3", "stages.student_soft.args.epochs=1",
              "stages.student_soft_ft.args.epochs=2"]


def kdpipe(*argv: str) -> list[str]:
    """The command line of ``kdpipe ARGV`` run by this interpreter from this checkout."""
    return [sys.executable, "-m", "pipeline", *argv]


def demo_command(out: Path, overrides: list[str] = QUICK_DEMO) -> list[str]:
    """``kdpipe demo --out OUT --set ...``."""
    return kdpipe("demo", "--out", str(out), *[a for o in overrides for a in ("--set", o)])


def environment() -> dict[str, str]:
    """The child's environment: this checkout first on the path, one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], log: Path | None = None, timeout: float = 900) -> int:
    """Run ``cmd`` to the end; return its exit code (output appended to ``log``)."""
    with open(log or os.devnull, "ab") as sink:
        return subprocess.run(cmd, env=environment(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False).returncode


def start(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a kill reaches every child)."""
    sink = open(log or os.devnull, "ab")
    proc = subprocess.Popen(cmd, env=environment(), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sink.close()
    return proc


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc``'s process group; True when it was still running (the kill landed)."""
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive and proc.returncode == -signal.SIGKILL


def kill_after(cmd: list[str], seconds: float, log: Path | None = None) -> bool:
    """Start ``cmd``, SIGKILL it after ``seconds``; True when it was killed (not finished before)."""
    proc = start(cmd, log)
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return kill_group(proc)


def kill_when(cmd: list[str], path: Path, log: Path | None = None, timeout: float = 300) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``path`` exists; True when it was killed."""
    proc = start(cmd, log)
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return kill_group(proc)


def fork_kill_when(fn, path: Path, timeout: float = 300) -> bool:
    """Run ``fn`` in a forked child (in-process stages, no interpreter start-up) and SIGKILL it as soon as ``path``
    exists; True when it was killed before it finished."""
    return fork_kill(fn, path.exists, timeout)


def fork_kill_after(fn, seconds: float) -> bool:
    """Run ``fn`` in a forked child and SIGKILL it after ``seconds``; True when the kill landed."""
    return fork_kill(fn, lambda: False, seconds)


def fork_kill(fn, ready, timeout: float) -> bool:
    """Run ``fn`` in a forked child and SIGKILL it once ``ready()`` or after ``timeout`` seconds, whichever is
    first; True when it was killed before it finished."""
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - any failure is an exit code
            code = 3
        os._exit(code)
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def snapshot(run_dir: Path) -> dict[str, str]:
    """``{relative path: id}`` of every manifest under ``run_dir`` and ``{relative path: sha256}`` of every file
    they list (files that are missing or unreadable get a marker, so they differ from a clean run)."""
    run_dir = Path(run_dir)
    out: dict[str, str] = {}
    for manifest in sorted(run_dir.rglob("manifest.json")):
        rel = manifest.relative_to(run_dir)
        if any(part in SKIP_DIRS for part in rel.parts):
            continue
        try:
            data = json.loads(manifest.read_bytes())
        except (OSError, ValueError) as exc:
            out[str(rel)] = f"unreadable: {exc}"
            continue
        out[str(rel)] = f"id {data.get('id')}"
        for entry in data.get("files", []):
            where = manifest.parent / entry["path"]
            key = str(where.relative_to(run_dir)) if "://" not in entry["path"] else entry["path"]
            out[key] = sha256_file(where) if where.is_file() else "missing"
    return out


def differences(clean: dict[str, str], other: dict[str, str]) -> list[str]:
    """Every path whose id/sha256 differs, or that only one of the two runs has."""
    keys = sorted(set(clean) | set(other))
    return [f"{k}: {clean.get(k, 'absent')} vs {other.get(k, 'absent')}" for k in keys if clean.get(k) != other.get(k)]


@dataclass
class Trial:
    """One seeded kill: when it landed, whether it landed, the plain rerun's exit code, the differences."""

    seed: int
    at_s: float
    killed: bool
    rerun_code: int
    diffs: list[str]

    @property
    def converged(self) -> bool:
        return self.rerun_code == 0 and not self.diffs


def kill_and_rerun(seed: int, make_cmd, out: Path, clean: dict[str, str], window_s: float,
                   log: Path | None = None) -> Trial:
    """Kill ``make_cmd(out)`` at a seeded instant in ``[0.5, window_s)``, rerun it plainly, compare with ``clean``."""
    at = random.Random(seed).uniform(0.5, window_s)
    killed = kill_after(make_cmd(out), at, log)
    code = run(make_cmd(out), log)
    return Trial(seed, round(at, 2), killed, code, differences(clean, snapshot(out)))


def summary_line(trials: list[Trial]) -> str:
    """``N of N kills converged`` (kills that landed; a run that finished before its instant is not a kill)."""
    landed = [t for t in trials if t.killed]
    return f"{sum(t.converged for t in landed)} of {len(landed)} kills converged"

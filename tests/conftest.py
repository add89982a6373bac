"""Shared fixtures. ``slurm_cluster``: a real one-node SLURM cluster (Debian's slurm-wlm) for one test session.

The fixture writes a slurm.conf (``AuthType=auth/none``, this host as the only node, state in a temp folder,
free ports so that it never meets another cluster), starts ``slurmctld`` and ``slurmd`` as root, waits until
``sinfo`` shows the node idle, exports ``SLURM_CONF`` for the session, and stops both daemons by their pids at
the end. It skips, saying why, when the binaries are missing or the tests do not run as root.

Several harnesses run stages in a forked child (kill points, concurrent writers). An OpenMP thread pool does not
survive fork(): the child of a process that already ran torch or faiss on several threads can hang in its first
parallel region. A real task is a fresh process (SLURM, ``kdpipe run``), so the suite runs OpenMP on one thread
(set here, before torch or faiss is imported); a test that needs threads sets them itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # see the module docstring: forked harnesses
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_helpers"]  # s3_server (moto_server), http_server (http.server) fixtures

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
SLURM_CONF = """\
ClusterName=kdpipetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
AuthInfo=cred_expire=5
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/ctld.log
SlurmdLogFile={tmp}/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
MinJobAge=600
KillWait=5
MessageTimeout=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=100 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@dataclass
class SlurmCluster:
    """A running test cluster: its config file and temp folder (its logs are there)."""

    conf: Path
    folder: Path
    host: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _missing_reason() -> str | None:
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM binaries missing ({', '.join(missing)}): install slurm-wlm (scripts/ci_install_slurm.sh)"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmctld/slurmd as root (SlurmUser=root); tests are not root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait_idle(env: dict, deadline_s: float, log_files: list[Path]) -> None:
    stop = time.time() + deadline_s
    state = ""
    while time.time() < stop:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        state = done.stdout.strip()
        if done.returncode == 0 and state.startswith("idle"):
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}:\n{p.read_text()[-1500:]}" for p in log_files if p.exists())
    raise RuntimeError(f"SLURM node not idle after {deadline_s} s (sinfo: {state!r})\n{tails}")


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start slurmctld + slurmd for the session; yield a ``SlurmCluster``; stop both by pid."""
    reason = _missing_reason()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="kdpipe-slurm-"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, tmp=folder, ctld_port=_free_port(), d_port=_free_port(),
                                      cpus=os.cpu_count() or 1))
    cluster = SlurmCluster(conf, folder, host)
    env = cluster.env()
    saved = os.environ.get("SLURM_CONF")
    try:
        subprocess.run([_daemon("slurmctld"), "-c", "-f", str(conf)], env=env, check=True)
        subprocess.run([_daemon("slurmd"), "-f", str(conf)], env=env, check=True)
        _wait_idle(env, 30, [folder / "ctld.log", folder / "d.log"])
        os.environ["SLURM_CONF"] = str(conf)
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        _stop(folder / "slurmd.pid")
        _stop(folder / "slurmctld.pid")
        shutil.rmtree(folder, ignore_errors=True)

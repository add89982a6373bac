"""The pre-timeout signal (SIGUSR1) in the middle of a part of the REAL logits stage with DataLoader workers.

Expected, in both stop modes: the task exits with code 75 (requeue) within the grace time (10 s here; each forward
pass (one per part) is slowed to 1 s so that a part is in flight), nothing partial is published (only whole parts with
receipts, no temp file), no worker process outlives the task (every child pid seen before the signal is gone
once it exits), and the rerun completes with parts byte-identical to a clean run's. ``abandon`` runs in the
default suite, ``finish`` with ``-m slow``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from pipeline import manifest as mf
from pipeline.atomic import TEMP_PREFIX
from pipeline.signals import EXIT_REQUEUE
from tests.slurm_helpers import REPO
from tests.test_reliability_kill import part_files
from tests.test_reliability_support import RUNS, clean_chain

SLOW_RUN = textwrap.dedent("""
    import sys, time
    from stages.logits import inference
    from stages.logits.stage import compute_logits
    real = inference.Engine.run
    def run(self, pixels):
        time.sleep(1.0)
        return real(self, pixels)
    inference.Engine.run = run
    compute_logits(sys.argv[1], sys.argv[2], sys.argv[3], topk=3, temperature=2.0, num_workers=2, batch_size=32)
""")
GRACE_S = 10


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory)


@pytest.mark.parametrize("mode", ["abandon", pytest.param("finish", marks=pytest.mark.slow)])
def test_usr1_mid_part_exits_75_in_time_publishes_nothing_partial_and_leaves_no_workers(chain, tmp_path, mode):
    out = tmp_path / "logits"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "KDPIPE_STOP_MODE": mode, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(chain.data), str(chain.card), str(out)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "_parts").glob("part-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "no DataLoader worker was running"
    signalled = time.time()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert time.time() - signalled < GRACE_S
    time.sleep(0.5)
    alive = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"worker processes outlived the task: {alive}"
    receipts = sorted(p.name[:-5] for p in (out / "_parts").glob("part-*.json") if ".failed" not in p.name)
    assert sorted(p.stem for p in out.glob("part-*.parquet")) == receipts and len(receipts) < 4
    assert not list(out.rglob(f"{TEMP_PREFIX}*")) and not (out / "manifest.json").exists()
    RUNS["logits"](chain, out)
    assert part_files(out) == part_files(chain.logits) and mf.load(out).id == mf.load(chain.logits).id

"""Crash safety of the part framework, per stage: SIGKILL at seeded random kill points, then a rerun, converges to
byte-identical parts (same manifest id as a clean run), no temp files, no duplicate keys. And the pre-timeout
stop request (USR1) without SLURM: finish or abandon the part in flight, exit 75, the rerun completes.

Kill points are ``pipeline.signals.fault_point`` names in ``PartStore.commit`` and ``atomic.write_atomic``
(``KDPIPE_FAULT=point:count``). Each trial forks a child that runs the stage in-process and SIGKILLs itself at the
chosen point; the parent then reruns the stage to completion. Cases are parametrised by stage command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline.atomic import TEMP_PREFIX
from pipeline.signals import EXIT_REQUEUE, FAULT_ENV
from tests.slurm_helpers import REPO, part_digests

POINTS = ("part.begin", "part.written", "part.validated", "part.published", "part.receipt", "atomic.staged")
TRIALS = 20


@dataclass
class Case:
    """A stage under test: build its inputs once, run it to completion in-process, read a part's keys."""

    setup: Callable[[Path], dict]
    run: Callable[[dict, Path], None]
    keys: Callable[[Path], list[str]]
    parts: int


def tar_keys(path: Path) -> list[str]:
    """WebDataset sample keys of a tar in order (a key = member path up to the first dot of its basename)."""
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for name in tar.getnames():
            folder, _, base = name.rpartition("/")
            key = (folder + "/" if folder else "") + base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def parquet_keys(path: Path) -> list[str]:
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def _ingest_case() -> Case:
    from PIL import Image

    from stages.ingest.stage import ingest

    def setup(root: Path) -> dict:
        rng = np.random.default_rng(0)
        for i in range(48):  # a labeled folder: 3 classes x 16 tiny PNGs -> 6 shards of 8
            folder = root / "src" / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
        return {"src": str(root / "src")}
    return Case(setup=setup, keys=tar_keys, parts=6, run=lambda ctx, out: ingest(ctx["src"], out, shard_size=8))


def _logits_case() -> Case:
    from stages.logits.stage import compute_logits
    from tests.test_logits_support import digits_data, train_card

    def setup(root: Path) -> dict:
        return {"data": digits_data(root / "data", shard_size=20, samples=80),
                "card": train_card(root / "teacher", None, steps=0)}
    run = lambda ctx, out: compute_logits(ctx["data"], ctx["card"], out, topk=3, temperature=2.0, num_workers=0,
                                          batch_size=32)
    return Case(setup=setup, run=run, keys=parquet_keys, parts=4)


def _reshard_case() -> Case:
    from stages.ingest.stage import ingest
    from stages.reshard.stage import reshard
    from stages.shardio import ShardStats, read_shard
    from tests.factories import make_logits, make_selection

    def setup(root: Path) -> dict:
        data = mf.load(ingest("digits", root / "data", shard_size=40, split="pool=160,rest=rest")["pool"])
        rng = np.random.default_rng(0)
        shards = []
        for entry in data.files:
            keys = [k for k, _ in read_shard(data.file_path(entry), ShardStats("x"))]
            shards.append((keys, rng.normal(size=(len(keys), 10)).astype(np.float32)))
        logits = make_logits(root / "logits", shards, topk=3, temperature=2.0, data=data.path)
        return {"selection": make_selection(root / "selection", logits, per_class=8)}
    return Case(setup=setup, run=lambda ctx, out: reshard(ctx["selection"], out, shard_size=20),
                keys=tar_keys, parts=4)


CASES = {"ingest": _ingest_case, "logits": _logits_case, "reshard": _reshard_case}


def _fork(fn: Callable[[], None], env: dict[str, str], timeout_s: float = 120) -> int:
    """Run ``fn`` in a forked child with ``env`` added; return its wait status (killed children: -signal)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.environ.update(env)
            import torch
            torch.set_num_threads(1)
            fn()
        except BaseException:  # noqa: BLE001 - report any failure as an exit code
            code = 3
        os._exit(code)
    stop = time.time() + timeout_s
    while time.time() < stop:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"forked stage run did not finish in {timeout_s} s")


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"{TEMP_PREFIX}*")]


def _keys_of(folder: Path, case: Case) -> list[str]:
    manifest = mf.load(folder)
    return [k for entry in manifest.files for k in case.keys(manifest.file_path(entry))]


@pytest.mark.parametrize("command", list(CASES))
def test_sigkill_at_seeded_points_then_rerun_is_byte_identical(command, tmp_path):
    case = CASES[command]()
    ctx = case.setup(tmp_path / "inputs")
    assert _fork(lambda: case.run(ctx, tmp_path / "clean"), {}) == 0
    clean_id, clean_parts = mf.load(tmp_path / "clean").id, part_digests(tmp_path / "clean")
    assert len(clean_parts) == case.parts
    rng = np.random.default_rng(20261127)
    killed = Counter()
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial:02d}"
        point, count = str(rng.choice(POINTS)), int(rng.integers(1, case.parts + 1))
        status = _fork(lambda: case.run(ctx, out), {FAULT_ENV: f"{point}:{count}"})
        assert status in (0, -signal.SIGKILL), f"trial {trial} ({point}:{count}) exited {status}"
        killed[point] += status == -signal.SIGKILL
        assert _fork(lambda: case.run(ctx, out), {}) == 0, f"rerun of trial {trial} ({point}:{count}) failed"
        assert part_digests(out) == clean_parts, f"trial {trial} ({point}:{count}): parts differ"
        assert mf.load(out).id == clean_id
        assert not _temps(out), f"trial {trial} ({point}:{count}): temp files left"
        keys = _keys_of(out, case)
        assert len(keys) == len(set(keys)) == mf.load(out).totals["samples"]
    assert sum(killed.values()) >= TRIALS * 3 // 4, f"too few trials were actually killed: {killed}"


def test_fault_point_is_inert_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    from pipeline.signals import fault_point
    fault_point("part.begin")  # returns; a kill here would end the test run


# --- the stop request (USR1) without SLURM, on the fake stage -------------------------------------------------

def _fake(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.fake_stage", "slow", "--parts", "5", "--rows", "8", "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)


def _wait_for_receipts(out: Path, count: int, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    stop = time.time() + timeout_s
    while time.time() < stop and proc.poll() is None:
        if len(list((out / "_parts").glob("part-*.json"))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{out}: {count} receipt(s) never appeared")


@pytest.mark.parametrize("mode", ["finish", "abandon"])
def test_usr1_stops_the_task_with_exit_75_and_the_rerun_completes(mode, tmp_path):
    clean = tmp_path / "clean"
    assert subprocess.run([sys.executable, "-m", "tests.fake_stage", "slow", "--parts", "5", "--rows", "8",
                           "--out", str(clean)], cwd=REPO).returncode == 0
    out = tmp_path / "stopped"
    proc = _fake(out, "--sleep", "0.8", env={"KDPIPE_STOP_MODE": mode})
    _wait_for_receipts(out, 1, proc)
    time.sleep(0.3)  # part 1 is in flight
    signalled = time.time()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    committed = sorted(p.name for p in (out / "_parts").glob("part-*.json"))
    if mode == "finish":
        assert committed == ["part-000000.json", "part-000001.json"]  # the part in flight was finished
    else:
        assert committed == ["part-000000.json"] and time.time() - signalled < 0.8  # abandoned at once
        assert not (out / "part-000001.tar").exists()
    assert not _temps(out) and not (out / "manifest.json").exists()
    rerun = _fake(out, "--sleep", "0")
    _, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err[-2000:]
    assert "2 already done" in err if mode == "finish" else "1 already done" in err
    assert part_digests(out) == part_digests(clean) and mf.load(out).id == mf.load(clean).id

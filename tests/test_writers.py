"""One writer per output: two writers of one output folder, the first paused (SIGSTOP-like, in a forked child) right
after it took the folder and before it published its first part, the second run to its end meanwhile.

Expected, for the three mixes reported (select ``--per-class`` 5 vs 3, logits T 2 vs 4, reshard shard sizes 5 vs
10): the second writer is refused before any work, exit 2, naming the folder and the parameter that differs; the
first then completes, exit 0; every receipt in the folder carries the manifest's fingerprint, ``kdpipe verify``
passes with content checks (per-class rows within ``per_class``, logits metadata T/K/C as the manifest says, no
stray part), and every file equals a clean run's. With the same parameters the second writer cooperates: both
exit 0 and the folder equals a clean run's. And verify names what a mix leaves: a stray part, a selection with
more rows per class than its quota, a logits part whose metadata says another T.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.lease import take
from pipeline.parts import fingerprint
from pipeline.verify import verify
from stages.artifacts.checks import CHECKS
from tests import chaos
from tests.test_reliability_support import clean_chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory)


def _argv(chain, stage: str, out: Path, value) -> list[str]:
    if stage == "select":
        return ["select", "--logits", str(chain.logits), "--per-class", str(value), "--top-p", "2", "--out", str(out)]
    if stage == "logits":
        return ["logits", "--data", str(chain.data), "--teacher", str(chain.card), "--topk", "3", "--temperature",
                str(value), "--num-workers", "0", "--batch-size", "32", "--out", str(out)]
    return ["reshard", "--selection", str(chain.select), "--shard-size", str(value), "--out", str(out)]


def _fork_cli(argv: list[str], pause_dir: Path | None = None) -> int:
    """Fork a child running ``kdpipe ARGV``; with ``pause_dir`` it stops at its first ``part.begin`` (it has taken
    the folder by then) until ``pause_dir/go`` exists. Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        if pause_dir is not None:
            import pipeline.parts as parts
            real, hits = parts.fault_point, []

            def pause(name: str) -> None:
                if name == "part.begin" and not hits:
                    hits.append(name)
                    (pause_dir / "paused").touch()
                    while not (pause_dir / "go").exists():
                        time.sleep(0.01)
                real(name)
            parts.fault_point = pause
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    raise TimeoutError(f"writer pid {pid} did not finish in {timeout} s")


def _two_writers(first: list[str], second: list[str], pause_dir: Path) -> tuple[int, int]:
    """Run ``first`` until it pauses, ``second`` to its end, then let ``first`` finish; return both exit codes."""
    pause_dir.mkdir()
    a = _fork_cli(first, pause_dir)
    deadline = time.time() + 120
    while not (pause_dir / "paused").exists():
        assert time.time() < deadline, "the first writer never reached its first part"
        time.sleep(0.01)
    b = _wait(_fork_cli(second))
    (pause_dir / "go").touch()
    return _wait(a), b


def _receipt_fingerprints(folder: Path) -> set[str]:
    return {json.loads(p.read_text())["fingerprint"]["hash"] for p in folder.rglob("_parts/part-*.json")
            if not p.name.endswith(".failed.json")}


MIXES = [("select", 5, 3, "per_class"), ("logits", 2.0, 4.0, "temperature"), ("reshard", 5, 10, "shard_size")]


@pytest.mark.parametrize("stage, ours, theirs, param", MIXES, ids=[m[0] for m in MIXES])
def test_a_second_writer_with_other_parameters_is_refused_before_any_work(chain, tmp_path, capfd, stage, ours,
                                                                          theirs, param):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert _wait(_fork_cli(_argv(chain, stage, clean, ours))) == 0
    capfd.readouterr()
    first, second = _two_writers(_argv(chain, stage, out, ours), _argv(chain, stage, out, theirs), tmp_path / "p")
    err = capfd.readouterr().err
    assert (first, second) == (0, 2), err
    assert f"{out}" in err and "another writer holds this output folder" in err and f"{param}:" in err
    assert "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(_receipt_fingerprints(out)) == (2 if stage == "select" else 1)  # select: map + reduce stores
    assert _receipt_fingerprints(out) == _receipt_fingerprints(clean)
    assert verify(out / "manifest.json", CHECKS) == []
    assert chaos.differences(chaos.snapshot(clean), chaos.snapshot(out)) == []
    assert manifest["id"] == json.loads((clean / "manifest.json").read_text())["id"]
    assert not list((out / "_parts").glob("_lease-*.lock"))  # given back


def test_a_second_writer_with_the_same_parameters_cooperates(chain, tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert _wait(_fork_cli(_argv(chain, "logits", clean, 2.0))) == 0
    codes = _two_writers(_argv(chain, "logits", out, 2.0), _argv(chain, "logits", out, 2.0), tmp_path / "p")
    assert codes == (0, 0)
    assert chaos.differences(chaos.snapshot(clean), chaos.snapshot(out)) == []


def test_a_killed_writer_leaves_no_lease_behind(chain, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "p").mkdir()
    pid = _fork_cli(_argv(chain, "select", out, 3), tmp_path / "p")
    while not (tmp_path / "p" / "paused").exists():
        time.sleep(0.01)
    assert list((out / "_map").rglob("_lease-*.lock"))  # held while it works
    os.kill(pid, 9)
    _wait(pid)
    assert _wait(_fork_cli(_argv(chain, "select", out, 5))) == 0  # the dead writer's lease is stale: taken over
    assert verify(out / "manifest.json", CHECKS) == []


def test_the_lease_is_refused_then_taken_over_once_its_holder_is_gone(tmp_path):
    ours, theirs = fingerprint("s", {"k": 1}, "v1"), fingerprint("s", {"k": 2}, "v1")
    held = take(tmp_path / "_parts", ours)
    joined = take(tmp_path / "_parts", ours)  # the same fingerprint shares it
    with pytest.raises(Exception, match=r"another writer holds this output folder .*pid \d+.*k: 1 vs 2"):
        take(tmp_path / "_parts", theirs)
    held.release()
    with pytest.raises(Exception, match="k: 1 vs 2"):
        take(tmp_path / "_parts", theirs)
    joined.release()
    take(tmp_path / "_parts", theirs).release()
    assert sorted(p.name for p in (tmp_path / "_parts").iterdir()) == ["_lease.lock"]


def test_verify_names_a_stray_part_an_over_quota_selection_and_a_logits_part_of_another_t(chain, tmp_path):
    reshard = tmp_path / "reshard"
    shutil.copytree(chain.reshard, reshard)
    shutil.copy(reshard / "part-000000.tar", reshard / "part-000099.tar")
    assert any("part-000099.tar: a part file the manifest does not list" in p for p in verify(reshard, CHECKS))
    logits = tmp_path / "logits"
    shutil.copytree(chain.logits, logits)
    assert main(["logits", "--data", str(chain.data), "--teacher", str(chain.card), "--topk", "3", "--temperature",
                 "4.0", "--num-workers", "0", "--batch-size", "32", "--out", str(tmp_path / "t4")]) == 0
    _swap_in(logits, tmp_path / "t4" / "part-000001.parquet")
    assert any("metadata temperature=4.0, the manifest says 2.0" in p for p in verify(logits, CHECKS))
    select = tmp_path / "select"
    assert main(_argv(chain, "select", tmp_path / "s5", 5)) == 0
    assert main(_argv(chain, "select", select, 3)) == 0
    _swap_in(select, tmp_path / "s5" / "part-000000.parquet")
    assert any("more rows than the manifest's quota (class 0: 5 rows > per_class 3" in p
               for p in verify(select, CHECKS))


def _swap_in(folder: Path, part: Path) -> None:
    """Put ``part`` in ``folder`` under its name and make the manifest list its size and sha256, the way a mixed
    commit leaves it (the bytes match the manifest; only the content checks can tell)."""
    from pipeline import manifest as mf
    from pipeline.hashing import sha256_file
    shutil.copy(part, folder / part.name)
    data = json.loads((folder / "manifest.json").read_text())
    for entry in data["files"]:
        if entry["path"] == part.name:
            entry.update(bytes=part.stat().st_size, sha256=sha256_file(part), rows=pq.read_metadata(part).num_rows)
    data["id"] = mf.content_id(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_finalize_refuses_a_folder_holding_a_receipt_of_another_fingerprint(tmp_path):
    from pipeline.errors import FingerprintMismatch
    from pipeline.parts import PartResult, PartStore
    from pipeline.tasks import finalize, run_parts

    def store(k: int) -> PartStore:
        return PartStore(tmp_path, ".txt", fingerprint("t", {"k": k}, "v1"), lambda p: len(p.read_bytes().split()))

    def write(tmp: Path) -> PartResult:
        tmp.write_bytes(b"a b")
        return PartResult(expected_rows=2)
    ours = store(1)
    run_parts(ours, [0, 1], lambda i: ours.commit(i, write))
    (tmp_path / "_parts" / "part-000001.json").write_text(json.dumps(
        {**json.loads((tmp_path / "_parts" / "part-000001.json").read_text()),
         "fingerprint": fingerprint("t", {"k": 2}, "v1")}))  # what a writer that bypassed the lease leaves
    with pytest.raises(FingerprintMismatch, match=r"cannot finalize, 1 receipt\(s\) .*part-000001: k: 2 vs 1"):
        finalize(ours, 2, lambda receipts: {})
    assert not (tmp_path / "manifest.json").exists()

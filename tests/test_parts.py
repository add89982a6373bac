"""Atomic part commits and receipts: a killed writer leaves no visible part; reruns complete it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import atomic
from pipeline.errors import FingerprintMismatch
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.tasks import run_parts

FP = fingerprint("test", {"k": 1}, "test-1")


def _count(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def _store(folder: Path, fp=FP) -> PartStore:
    return PartStore(folder, ".txt", fp, _count)


def _writer(lines: int):
    def write(tmp: Path) -> PartResult:
        tmp.write_bytes(b"".join(b"row %d\n" % i for i in range(lines)))
        return PartResult(expected_rows=lines)
    return write


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline.parts import PartResult, PartStore, fingerprint
    store = PartStore(Path(sys.argv[1]), ".txt", fingerprint("test", {"k": 1}, "test-1"),
                      lambda p: len(p.read_bytes().splitlines()))
    store.prepare()
    def write(tmp):
        tmp.write_bytes(b"row 0\\nrow 1\\n")
        os.kill(os.getpid(), signal.SIGKILL)   # killed between write and rename
    store.commit(0, write)
""")


def test_sigkill_between_write_and_rename_leaves_no_part_and_rerun_completes(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path)], cwd=Path(__file__).parents[1])
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "part-000000.txt" not in names and any(n.startswith(atomic.TEMP_PREFIX) for n in names)
    store = _store(tmp_path)
    assert store.committed(0) is None
    report = run_parts(store, [0], lambda i: store.commit(i, _writer(2)))
    assert report.committed == [0] and report.exit_code == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(atomic.TEMP_PREFIX)]
    assert store.committed(0)["rows"] == 2


def test_rerun_skips_committed_parts_without_touching_them(tmp_path):
    store = _store(tmp_path)
    run_parts(store, [0, 1], lambda i: store.commit(i, _writer(3)))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*.txt")}
    report = run_parts(store, [0, 1], lambda i: pytest.fail("committed part recomputed"))
    assert report.skipped == [0, 1]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*.txt")} == before


@pytest.mark.parametrize("damage", [b"", b'{"part": 0, "rows"', b"\x00garbage"])
def test_truncated_or_garbage_receipt_means_not_done(tmp_path, damage):
    store = _store(tmp_path)
    run_parts(store, [0], lambda i: store.commit(i, _writer(2)))
    store.receipt_path(0).write_bytes(damage)
    assert store.committed(0) is None
    assert run_parts(store, [0], lambda i: store.commit(i, _writer(2))).committed == [0]


def test_part_that_differs_from_its_receipt_is_redone(tmp_path):
    store = _store(tmp_path)
    run_parts(store, [0], lambda i: store.commit(i, _writer(2)))
    store.part_path(0).write_bytes(b"row X\nrow 1\n")  # same size, other bytes
    assert store.committed(0) is None


def test_other_parameters_are_refused_never_mixed(tmp_path):
    store = _store(tmp_path)
    run_parts(store, [0], lambda i: store.commit(i, _writer(2)))
    other = _store(tmp_path, fingerprint("test", {"k": 2}, "test-1"))
    with pytest.raises(FingerprintMismatch, match=r"k: 1 vs 2.*new --out folder"):
        run_parts(other, [1], lambda i: other.commit(i, _writer(2)))


def test_wrong_row_count_publishes_nothing(tmp_path):
    store = _store(tmp_path)
    store.prepare()
    def short(tmp):
        tmp.write_bytes(b"row 0\n")
        return PartResult(expected_rows=2)
    report = run_parts(store, [0], lambda i: store.commit(i, short))
    assert 0 in report.failed and not store.part_path(0).exists()
    assert json.loads(store.failure_path(0).read_text())["attempts"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(atomic.TEMP_PREFIX)]


def test_a_writer_that_raises_enospc_leaves_nothing(tmp_path):
    store = _store(tmp_path)
    def full(tmp):
        tmp.write_bytes(b"row 0\n")
        raise OSError(28, "No space left on device")
    report = run_parts(store, [0, 1], lambda i: store.commit(i, full if i == 0 else _writer(1)))
    assert "No space left" in report.failed[0] and report.committed == [1]
    assert sorted(os.listdir(tmp_path)) == ["_parts", "part-000001.txt"]


def test_a_failing_fsync_publishes_nothing(tmp_path, monkeypatch):
    store = _store(tmp_path)
    real = atomic.fsync_file
    def broken(path):
        if ".failed.json" not in Path(path).name:  # the disk fails for the part, not the failure record
            raise OSError(5, "I/O error")
        real(path)
    monkeypatch.setattr(atomic, "fsync_file", broken)
    report = run_parts(store, [0], lambda i: store.commit(i, _writer(1)))
    assert report.failed and not store.part_path(0).exists()
    assert os.listdir(tmp_path) == ["_parts"]


def test_fsync_file_before_replace_and_folder_after(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic, "fsync_file", lambda p: calls.append(("fsync_file", Path(p).name.startswith(".tmp-"))))
    real_replace, real_dir = os.replace, atomic.fsync_dir
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append(("replace",)), real_replace(a, b)))
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (calls.append(("fsync_dir",)), real_dir(p)))
    atomic.write_atomic(tmp_path / "x", b"data")
    assert calls == [("fsync_file", True), ("replace",), ("fsync_dir",)]


def test_two_writers_of_one_part_one_commit_wins(tmp_path):
    store = _store(tmp_path)
    store.prepare()
    def racing(tmp):
        tmp.write_bytes(b"row A\n")
        store.commit(0, _writer(1))  # another task commits the same part meanwhile
        return PartResult(expected_rows=1)
    receipt = store.commit(0, racing)
    assert receipt == store.committed(0)
    assert store.part_path(0).read_bytes() == b"row 0\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(atomic.TEMP_PREFIX)]


def test_a_part_that_always_fails_is_given_up_after_max_attempts(tmp_path):
    store = _store(tmp_path)
    def poisoned(tmp):
        raise OSError("truncated shard")
    for _ in range(3):
        run_parts(store, [0], lambda i: store.commit(i, poisoned), max_attempts=3)
    report = run_parts(store, [0], lambda i: pytest.fail("given-up part retried"), max_attempts=3)
    assert report.given_up == [0] and report.exit_code == 1
    retry = run_parts(store, [0], lambda i: store.commit(i, _writer(1)), max_attempts=3, retry_failed=True)
    assert retry.committed == [0] and not store.failure_path(0).exists()

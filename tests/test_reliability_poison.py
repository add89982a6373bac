"""A part that fails every time (a poisoned shard), and a disk that fills up mid-part, on the real digits chain.

Expected:
- poisoned shard (a dataset shard truncated mid-member) under logits, and a poisoned source shard under reshard:
  each run fails that part only (``PartFailed`` naming it, failure record with reason and attempts), the other
  parts commit; after ``max_attempts`` (2 here) failed runs the part is given up (not attempted again, attempts
  stay 2); ``kdpipe status DIR`` shows ``committed/total`` and the part as ``FAILED x2 (reason)``; once the
  shard is repaired, a run with ``retry_failed`` computes only that part (every other file keeps its sha256 and
  mtime) and the artifact is byte-identical to a clean run's;
- ENOSPC: reshard's output folder on a real 512 KiB tmpfs filled so that only the first part fits (or nothing
  fits): every part that did not fit fails with "<part path>: [Errno 28] No space left on device" (reason
  ``no_space``; the task does not crash even when the failure record cannot be written), nothing is published
  for it and no temp file is left; after space is freed, the rerun completes with parts byte-identical to a clean
  run's. (Skipped where ``mount -t tmpfs`` is not permitted; ``tests/test_parts.py`` covers a writer that raises
  ENOSPC.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.atomic import TEMP_PREFIX
from pipeline.cli import main
from pipeline.errors import PartFailed
from tests.test_reliability_kill import part_files
from tests.test_reliability_support import RUNS, Chain, clean_chain, snapshot


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory)


def _copy(chain: Chain, root: Path) -> Chain:
    src = Path(chain.logits).parent
    shutil.copytree(src, root)
    moved = lambda p: root / Path(p).relative_to(src)
    return Chain(moved(chain.data), moved(chain.card), moved(chain.logits), moved(chain.select), moved(chain.reshard))


def _status(folder: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["status", str(folder)]) == 0
    return capsys.readouterr().out


def _failure(folder: Path, index: int) -> dict:
    import json
    return json.loads((folder / "_parts" / f"part-{index:06d}.failed.json").read_text())


def test_poisoned_dataset_shard_is_bounded_reported_and_retried_alone(chain, tmp_path, capsys):
    mine = _copy(chain, tmp_path / "c")
    shard = Path(mine.data).parent / "part-000002.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2 + 100])  # truncated mid-member, size differs from the manifest
    out = tmp_path / "logits"
    for attempt in (1, 2, 3):
        with pytest.raises(PartFailed, match="part-000002"):
            RUNS["logits"](mine, out, max_attempts=2)
        assert _failure(out, 2)["attempts"] == min(attempt, 2)  # the 3rd run gives up without trying
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet",
                                                          "part-000003.parquet"]
    table = _status(out, capsys)
    assert "3/4" in table and "part-000002 FAILED x2 (unreadable_tar)" in table
    shard.write_bytes(original)
    before = snapshot(out)
    RUNS["logits"](mine, out, max_attempts=2, retry_failed=True)
    after = snapshot(out)
    changed = {name for name in before if before[name] != after.get(name)}
    assert changed <= {"_parts/part-000002.failed.json"}, changed
    assert {n for n in after if n not in before} >= {"part-000002.parquet", "_parts/part-000002.json", "manifest.json"}
    assert part_files(out) == part_files(chain.logits) and mf.load(out).id == mf.load(chain.logits).id
    assert not (out / "_parts" / "part-000002.failed.json").exists()


def test_poisoned_source_shard_fails_one_reshard_part_and_is_retried_alone(chain, tmp_path, capsys):
    mine = _copy(chain, tmp_path / "c")
    shard = Path(mine.data).parent / "part-000000.tar"
    original = shard.read_bytes()
    shard.write_bytes(b"\0" * len(original))  # not a tar any more
    out = tmp_path / "reshard"
    results = [RUNS["reshard"](mine, out, max_attempts=2) for _ in range(3)]
    failed = sorted(results[0].report.failed)
    assert failed and results[0].manifest is None and results[2].report.given_up == failed
    assert all(_failure(out, i)["attempts"] == 2 for i in failed)
    assert "FAILED x2" in _status(out, capsys)
    shard.write_bytes(original)
    before = snapshot(out)
    result = RUNS["reshard"](mine, out, retry_failed=True)
    assert sorted(result.report.committed) == failed and result.manifest is not None
    after = snapshot(out)
    assert all(after[name] == value for name, value in before.items() if not name.endswith(".failed.json"))
    assert part_files(out) == part_files(chain.reshard) and mf.load(out).id == mf.load(chain.reshard).id


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("headroom", ["one_part", "none"])
def test_enospc_publishes_nothing_names_the_part_and_the_rerun_after_freeing_space_completes(chain, tiny_disk,
                                                                                              headroom):
    first = Path(chain.reshard) / "part-000000.tar"
    filler = tiny_disk / "filler"
    stat = os.statvfs(tiny_disk)
    keep = int(first.stat().st_size * 1.6) + 16 * 4096 if headroom == "one_part" else 0
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - keep))
    out = tiny_disk / "reshard"
    result = RUNS["reshard"](chain, out)
    assert result.manifest is None and result.report.failed
    for index, message in result.report.failed.items():
        assert message.startswith(f"{out / f'part-{index:06d}.tar'}: [Errno 28] No space left on device")
        assert not (out / f"part-{index:06d}.tar").exists()
    assert ("part-000000.tar" in os.listdir(out)) == (headroom == "one_part")
    assert not [p for p in out.rglob(f"{TEMP_PREFIX}*")]
    filler.unlink()
    again = RUNS["reshard"](chain, out)
    assert again.manifest is not None and sorted(again.report.committed) == sorted(result.report.failed)
    assert part_files(out) == part_files(chain.reshard) and mf.load(out).id == mf.load(chain.reshard).id
    assert not [p for p in out.rglob(f"{TEMP_PREFIX}*")]

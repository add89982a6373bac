"""SIGKILL at the named points of the real logits -> select -> reshard chain, then a rerun.

Expected, for every (stage, point): the killed run dies by SIGKILL; at that moment ``manifest.json`` is either
absent or complete (never partial); the rerun exits 0 and the folder then satisfies the invariants:
rows + counted failures = the input's count, no duplicate keys, the key set equals the input's, no temp file
anywhere in the folder, every receipt's sha256 matches its file, and every part file (map parts included) is
byte-identical to a clean run's, with the same manifest id.

Points: ``before_any_write`` (``part.begin``, first part), ``mid_part_write`` (a Parquet row group half written
for logits and select, a tar half written for reshard: the child's writer is wrapped to write half of a chunk and
SIGKILL itself), ``after_rename_before_receipt`` (``part.published``), ``during_finalize`` (the manifest's temp
half written). One case per stage runs in the default suite, the full 3 x 4 matrix with ``-m slow`` (~50 s).
Kill points reuse ``pipeline.signals.fault_point`` (``KDPIPE_FAULT``) where the framework has one.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.atomic import TEMP_PREFIX, temp_path_for
from pipeline.hashing import sha256_file
from pipeline.signals import FAULT_ENV
from stages.artifacts.logits_reader import open_logits
from stages.reshard.plan import sample_key
from stages.reshard.stage import iter_training_samples
from stages.shardio import ShardStats, read_shard
from tests.test_faults import _fork
from tests.test_reliability_support import RUNS, Chain, clean_chain

POINTS = ("before_any_write", "mid_part_write", "after_rename_before_receipt", "during_finalize")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    return clean_chain(tmp_path_factory)


# --- kill devices, installed in the forked child only ----------------------------------------------------------

class _KillingFile(io.FileIO):
    """A file that writes half of its first data chunk after the Parquet magic, then SIGKILLs the process."""

    def write(self, data) -> int:
        if self.tell() >= 4 and len(data) > 1:
            super().write(bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write(data)


def _kill_on_nth(count: int, real, wrapper):
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        return wrapper(*args, **kwargs) if calls[0] == count else real(*args, **kwargs)
    return patched


def _mid_parquet(count: int) -> None:
    import pyarrow.parquet as pq
    real = pq.write_table
    pq.write_table = _kill_on_nth(count, real, lambda table, where, **kw: real(table, _KillingFile(where, "wb"), **kw))


def _mid_tar(count: int) -> None:
    import stages.reshard.stage as module
    real = module.write_shard

    def half(path, samples):
        def gen():
            for i, sample in enumerate(samples):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield sample
        return real(path, gen())
    module.write_shard = _kill_on_nth(count, real, half)


def _mid_manifest(count: int) -> None:
    from pipeline import manifest as module

    def partial(final, data, **_):
        temp_path_for(final).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    module.write_atomic = _kill_on_nth(count, module.write_atomic, partial)


def _install(stage: str, point: str) -> dict[str, str]:
    """Install the kill device of ``point`` in this (child) process; return env additions."""
    if point == "before_any_write":
        return {FAULT_ENV: "part.begin:1"}
    if point == "after_rename_before_receipt":
        return {FAULT_ENV: "part.published:2"}
    if point == "mid_part_write":
        _mid_tar(2) if stage == "reshard" else _mid_parquet(2)
    else:  # select writes its report's manifest first, then its own
        _mid_manifest(2 if stage == "select" else 1)
    return {}


def _killed(stage: str, point: str, chain: Chain, out: Path) -> int:
    def child():
        os.environ.update(_install(stage, point))
        RUNS[stage](chain, out)
    return _fork(child, {})


# --- invariants --------------------------------------------------------------------------------------------------

def part_files(folder: Path) -> dict[str, str]:
    """sha256 of every part file under ``folder`` (map parts too), by relative path."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("part-*"))
            if p.is_file() and p.parent.name != "_parts"}


def assert_folder_sound(folder: Path) -> None:
    """No temp file anywhere; every receipt's sha256 and bytes match its part file."""
    assert not [p for p in folder.rglob(f"{TEMP_PREFIX}*")], f"{folder}: temp files left"
    receipts = [p for p in folder.rglob("_parts/part-*.json") if not p.name.endswith(".failed.json")]
    assert receipts
    for receipt in receipts:
        body = json.loads(receipt.read_bytes())
        part = receipt.parent.parent / body["file"]
        assert sha256_file(part) == body["sha256"] and part.stat().st_size == body["bytes"], part


def _dataset_keys(data: Path) -> list[str]:
    manifest = mf.load(data)
    return [k for e in manifest.files for k, _ in read_shard(manifest.file_path(e), ShardStats("x"))]


def assert_logits_invariants(chain: Chain, out: Path) -> None:
    manifest, logits = mf.load(out), open_logits(out)
    keys = [k for i in range(logits.num_parts) for k in logits.read_part(i, ["key"]).column("key").to_pylist()]
    failed = sum(manifest.totals["failures"].values())
    assert len(keys) + failed == manifest.totals["samples"] == mf.load(chain.data).totals["samples"]
    assert len(set(keys)) == len(keys) and set(keys) == set(_dataset_keys(chain.data))


def assert_select_invariants(chain: Chain, out: Path) -> None:
    import pyarrow.parquet as pq
    table = pq.read_table(out / "part-000000.parquet")
    rows = list(zip(*(table.column(c).to_pylist() for c in ("key", "label", "dup"))))
    images = sum(json.loads(p.read_bytes())["extra"]["images"] for p in out.glob("_map/*/_parts/part-*.json"))
    assert images == mf.load(chain.logits).totals["rows"]
    assert len(set(rows)) == len(rows) == mf.load(out).totals["rows"]
    assert {k for k, _, _ in rows} <= set(_dataset_keys(chain.data))


def assert_reshard_invariants(chain: Chain, out: Path) -> None:
    import pyarrow.parquet as pq
    table = pq.read_table(mf.load(chain.select).folder / "part-000000.parquet")
    wanted = {sample_key(k, l, d) for k, l, d in zip(*(table.column(c).to_pylist() for c in ("key", "label", "dup")))}
    keys = [k for k, _ in iter_training_samples(out)]
    manifest = mf.load(out)
    assert len(keys) + sum(manifest.totals["failures"].values()) == table.num_rows
    assert len(set(keys)) == len(keys) and set(keys) == wanted


INVARIANTS = {"logits": assert_logits_invariants, "select": assert_select_invariants,
              "reshard": assert_reshard_invariants}


FAST = {("logits", "mid_part_write"), ("select", "during_finalize"), ("reshard", "after_rename_before_receipt")}
CASES = [pytest.param(stage, point, marks=() if (stage, point) in FAST else pytest.mark.slow)
         for stage in RUNS for point in POINTS]


@pytest.mark.parametrize("stage, point", CASES)
def test_sigkill_at_a_named_point_then_rerun_gives_the_clean_bytes(chain, stage, point, tmp_path):
    out = tmp_path / stage
    assert _killed(stage, point, chain, out) == -signal.SIGKILL
    manifest = out / mf.MANIFEST_NAME
    assert not manifest.exists() or mf.load(manifest).id == mf.load(getattr(chain, stage)).id  # old or new
    if point == "during_finalize":
        assert not manifest.exists() and list(out.glob(f"{TEMP_PREFIX}manifest.json*"))
    if point == "mid_part_write":  # the killed writer left a half-written temp part, never a published one
        assert [p for p in out.rglob(f"{TEMP_PREFIX}part-*") if p.stat().st_size > 0]
    assert _fork(lambda: RUNS[stage](chain, out), {}) == 0
    clean = getattr(chain, stage)
    assert part_files(out) == part_files(clean)
    assert mf.load(out).id == mf.load(clean).id
    assert_folder_sound(out)
    INVARIANTS[stage](chain, out)

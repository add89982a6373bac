"""Chain-level idempotence: a killed ``kdpipe run`` converges with a plain rerun; a stage is complete only when
everything it promises exists.

Expected:
- a ``kdpipe run`` killed while a training stage (a teacher) holds checkpoints reruns, with no flag, to the
  same manifest ids and file sha256 as a clean run; a rerun with another training parameter is refused (rc 2),
  naming the parameter and the checkpoints folder;
- select killed at every atomic write it makes (receipts, plan, sidecars, each report file, the report's and the
  selection's manifests): a selection manifest never exists without its complete report, and the plain rerun
  gives the clean run's files;
- a selection manifest whose report is missing (made by an older kdpipe, or damaged) is not complete: verify
  names the report, ``kdpipe run`` reruns select, which writes the report and keeps the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.run import run_pipeline
from pipeline.config import load_config
from pipeline.signals import FAULT_ENV
from pipeline.verify import verify
from stages.artifacts.checks import CHECKS
from tests import chaos
from tests.test_faults import _fork
from tests.test_reliability_support import clean_chain, run_select

TEACHER_CHAIN = """
name: chain
run_dir: {run_dir}
env: {{OMP_NUM_THREADS: 1}}
stages:
  data:
    command: ingest
    argv: [digits]
    mode: single
    args: {{split: "labeled=10/class,rest=200,unused=rest", shard_size: 100, seed: 0}}
    outputs: [labeled, rest]
  teacher:
    command: teacher
    args: {{train: "${{data}}/labeled", epochs: {epochs}, batch_size: 10, lr: 0.05, threads: 1, size: 28}}
  logits:
    command: logits
    args: {{data: "${{data}}/rest", teacher: "${{teacher}}", topk: 3, temperature: 2.0, num_workers: 0}}
"""


def _config(folder: Path, run_dir: Path, epochs: int = 6) -> Path:
    path = folder / f"chain-{run_dir.name}.yaml"
    path.write_text(TEACHER_CHAIN.format(run_dir=run_dir, epochs=epochs))
    return path


def _run(config: Path) -> list[str]:
    return [o.status for o in run_pipeline(load_config(config))]


def test_a_kdpipe_run_killed_in_a_training_stage_resumes_with_no_flag_to_the_clean_artifacts(tmp_path, caplog):
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    assert _run(_config(tmp_path, clean)) == ["done"] * 3
    pointer = cut / "teacher" / "checkpoints" / "latest.json"
    assert chaos.fork_kill_when(lambda: run_pipeline(load_config(_config(tmp_path, cut))), pointer)
    assert not (cut / "teacher" / "manifest.json").exists() and json.loads(pointer.read_text())["step"] < 60
    assert _run(_config(tmp_path, cut)) == ["skipped", "done", "done"]  # no --resume, no --set
    assert chaos.differences(chaos.snapshot(clean), chaos.snapshot(cut)) == []
    (cut / "teacher" / "manifest.json").unlink()  # as if killed while writing the card: checkpoints remain
    assert main(["run", str(_config(tmp_path, cut, epochs=7))]) == 2
    text = caplog.text
    assert "config.epochs: 6 -> 7" in text and f"{cut / 'teacher' / 'checkpoints'}: holds checkpoints" in text
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory)


def _files(folder: Path) -> dict[str, str]:
    return {k: v for k, v in chaos.snapshot(folder).items() if not k.startswith("_map")}


def _writes(chain, out: Path, record: Path) -> None:
    """Run select in this (forked) process and record how many atomic writes it made."""
    import pipeline.atomic as atomic
    real, calls = atomic.fault_point, []
    atomic.fault_point = lambda name: (calls.append(name), real(name))
    run_select(chain, out, gallery=2)
    record.write_text(str(calls.count("atomic.staged")))


def _kill_at_writes(chain, tmp_path: Path, counts) -> int:
    """Kill select at each of ``counts`` (its n-th atomic write); check no manifest precedes its report and that
    the plain rerun gives the clean files. Returns how many runs were killed."""
    clean = tmp_path / "clean"
    assert _fork(lambda: run_select(chain, clean, gallery=2), {}) == 0
    expected = _files(clean)
    assert "report/counts.png" in expected and "report/gallery/class-00000.png" in expected
    killed = 0
    for count in counts:
        out = tmp_path / f"k{count}"
        code = _fork(lambda: run_select(chain, out, gallery=2), {FAULT_ENV: f"atomic.staged:{count}"})
        if code != -9:
            assert code == 0 and count > 8
            break
        killed += 1
        if (out / "manifest.json").exists():  # a published selection has its whole report
            assert (out / "report" / "manifest.json").exists(), f"kill at write {count}: manifest before report"
            assert verify(out / "manifest.json", CHECKS) == [], f"kill at write {count}"
        assert _fork(lambda: run_select(chain, out, gallery=2), {}) == 0
        assert _files(out) == expected, f"kill at write {count}"
        shutil.rmtree(out)
    return killed


def test_select_killed_in_its_report_never_has_published_its_manifest(chain, tmp_path):
    record = tmp_path / "writes"
    assert _fork(lambda: _writes(chain, tmp_path / "count", record), {}) == 0
    total = int(record.read_text())  # the last writes: report files, the report manifest, the selection manifest
    assert _kill_at_writes(chain, tmp_path, [total - 2, total - 1, total]) == 3


@pytest.mark.slow
def test_select_killed_at_every_write_never_publishes_its_manifest_before_its_report(chain, tmp_path):
    """~2 min: every atomic write select makes (receipts, plan, sidecars, each report file, manifests)."""
    assert _kill_at_writes(chain, tmp_path, range(1, 60)) > 8


def test_a_selection_without_its_report_is_incomplete_and_the_run_writes_the_report(chain, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "select.yaml"
    config.write_text(f"name: s\nrun_dir: {run_dir}\nstages:\n  select:\n    command: select\n    mode: single\n"
                      f"    args: {{logits: {chain.logits}, per_class: 5, top_p: 2, gallery: 2}}\n")
    cfg = load_config(config)
    assert [o.status for o in run_pipeline(cfg)] == ["done"]
    before = chaos.snapshot(run_dir)
    selection = run_dir / "select" / "manifest.json"
    mtime = selection.stat().st_mtime_ns
    shutil.rmtree(run_dir / "select" / "report")  # the state an older kdpipe left after a kill or ENOSPC
    problems = verify(selection, CHECKS)
    assert len(problems) == 1 and "the selection's report" in problems[0] and "no such manifest" in problems[0]
    assert [o.status for o in run_pipeline(cfg)] == ["done"]  # not "skipped": it was not complete
    assert chaos.snapshot(run_dir) == before and selection.stat().st_mtime_ns == mtime
    (run_dir / "select" / "report" / "counts.png").write_bytes(b"damaged")
    assert "counts.png: 7 bytes" in verify(selection, CHECKS)[0]
    assert [o.status for o in run_pipeline(cfg)] == ["done"]
    assert chaos.snapshot(run_dir) == before

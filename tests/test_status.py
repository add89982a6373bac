"""`kdpipe status`: parts committed / total, failed parts with reason and attempts, manifest state, SLURM states."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import yaml

from pipeline import parts
from pipeline.cli import main
from pipeline.cli.run import run_pipeline
from pipeline.cli.status import collect, folder_status, format_table
from pipeline.cli.submit import submit
from pipeline.config import load_config
from pipeline.errors import KdpipeError
from tests.slurm_helpers import REPO

FAKE = {"command": "slow", "entry": "tests.fake_stage", "args": {"parts": 5, "rows": 3, "fail_part": [3]}}


@pytest.fixture
def failed_run(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "workdir": str(REPO),
                                    "stages": {"fake": FAKE, "after": {**FAKE, "args": {"parts": 2}}}}, sort_keys=False))
    cfg = load_config(path)
    outcomes = run_pipeline(cfg)
    assert [(o.name, o.status, o.code) for o in outcomes] == [("fake", "failed", 1)]
    return path, cfg


def test_status_counts_committed_parts_and_names_failed_ones(failed_run, capsys):
    path, cfg = failed_run
    run_pipeline(cfg)  # a second attempt of part 3
    fake, after = collect(path)
    (folder,) = fake.folders
    assert (folder.committed, folder.total, folder.manifest) == (4, 5, "missing")
    assert folder.failed == {3: {"reason": "planted", "message": "part 3: planted failure (--fail-part)",
                                 "attempts": 2}}
    assert fake.state == "failed" and after.state == "not started" and after.folders[0].total is None
    assert [s.name for s in collect(cfg.run_dir)] == ["fake", "after"]  # config order, not alphabetical
    assert main(["status", str(cfg.run_dir)]) == 0
    table = capsys.readouterr().out
    assert "fake           failed               4/5  missing" in table
    assert "part-000003 FAILED x2 (planted): part 3: planted failure (--fail-part)" in table


def test_status_of_a_complete_stage_checks_its_manifest(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "workdir": str(REPO),
                                    "stages": {"fake": {**FAKE, "args": {"parts": 3}}}}))
    run_pipeline(load_config(path))
    out = tmp_path / "run" / "fake"
    assert main(["status", str(path), "--json", "--verify"]) == 0
    (stage,) = json.loads(capsys.readouterr().out)
    assert stage["state"] == "complete" and stage["folders"][0]["manifest"] == "verified"
    assert stage["folders"][0]["committed"] == stage["folders"][0]["total"] == 3
    (out / "part-000001.tar").write_bytes(b"damaged")
    assert folder_status(out).manifest == "ok"  # without --verify only the manifest itself is checked
    damaged = folder_status(out, verify_files=True)
    assert damaged.manifest == "damaged" and "part-000001.tar" in damaged.problems[0]


def test_status_reads_receipts_with_one_scandir_and_no_stat_per_part(failed_run, monkeypatch):
    _, cfg = failed_run
    calls = []
    real_scandir, real_stat = os.scandir, pathlib.Path.stat
    monkeypatch.setattr(parts.os, "scandir", lambda p: (calls.append(p), real_scandir(p))[1])

    def stat(self, *args, **kwargs):
        assert not self.name.startswith("part-"), f"stat of {self}"
        return real_stat(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "stat", stat)
    status = folder_status(cfg.stages["fake"].out)
    assert status.committed == 4 and len(calls) == 1


def test_status_shows_slurm_states_of_the_submitted_jobs(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "workdir": str(REPO),
                                    "stages": {"fake": {**FAKE, "array": 3}}}))
    ids = iter(["101", "102"])
    submit(load_config(path), runner=lambda argv: next(ids))
    answers = {"squeue": "101_0 RUNNING\n101_1 RUNNING\n101_2 PENDING\n",
               "scontrol": "JobId=102 JobName=x JobState=PENDING Reason=Dependency\n"}
    seen = []
    runner = lambda argv: (seen.append(argv), answers[argv[0]])[1]
    (stage,) = collect(tmp_path / "run", runner=runner)
    assert stage.jobs == [{"role": "tasks", "job_id": "101", "states": {"PENDING": 1, "RUNNING": 2}},
                          {"role": "finalize", "job_id": "102", "states": {"PENDING": 1}}]
    assert seen[0] == ["squeue", "-h", "-r", "-o", "%i %T", "-j", "101,102"]
    assert "slurm tasks     job 101        PENDING:1 RUNNING:2" in format_table([stage])


def test_status_of_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(KdpipeError, match="neither a run folder"):
        collect(tmp_path)

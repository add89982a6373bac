"""Against a real one-node SLURM cluster (the ``slurm_cluster`` fixture): a submitted chain equals a local run;
an array task cancelled mid-part then resubmitted; the pre-timeout USR1 -> requeue -> completion; a duplicated
submission where two tasks compute the same parts at once."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.cli.run import run_pipeline
from pipeline.cli.submit import load_submissions
from pipeline.config import load_config
from tests.slurm_helpers import array_states, digits_stage, job_state, part_digests, wait_jobs, write_config

pytestmark = pytest.mark.slurm
CRED_EXPIRE_S = 5  # AuthInfo=cred_expire in tests/conftest.py


def fake(parts: int, sleep: float, array: int) -> dict:
    return {"command": "slow", "entry": "tests.fake_stage", "args": {"parts": parts, "rows": 6, "sleep": sleep},
            "mode": "array", "array": array}


def _submit(config: Path, *extra: str) -> dict[str, str]:
    """``kdpipe submit`` in-process; return the job ids by ``stage:role`` of this submission."""
    assert main(["submit", str(config), *extra]) == 0
    run_dir = load_config(config).run_dir
    return {f"{j['stage']}:{j['role']}": j["job_id"] for j in load_submissions(run_dir)[-1]["jobs"]}


def _local(tmp_path: Path, stages: dict) -> Path:
    """The same stages run locally (``kdpipe run``) in another run folder; returns that folder."""
    config = write_config(tmp_path / "local.yaml", tmp_path / "local", stages)
    assert all(o.status == "done" for o in run_pipeline(load_config(config)))
    return tmp_path / "local"


def _wait_for(predicate, timeout_s: float = 60, what: str = "condition") -> None:
    stop = time.time() + timeout_s
    while time.time() < stop:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached after {timeout_s} s")


def _receipts(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "_parts").glob("part-*.json"))


def test_submitted_chain_completes_with_the_ids_of_a_local_run(slurm_cluster, tmp_path):
    stages = {"data": digits_stage(array=3, shard_size=300),
              "check": {"command": "verify", "argv": ["${data}/manifest.json"], "out": None}}
    config = write_config(tmp_path / "chain.yaml", tmp_path / "run", stages)
    ids = _submit(config)
    assert list(ids) == ["data:tasks", "data:finalize", "check:single"]
    local = _local(tmp_path, stages)  # while the cluster works
    wait_jobs(list(ids.values()), timeout_s=150)
    assert array_states(ids["data:tasks"]) == ["COMPLETED"] * 3
    assert [job_state(ids[k])["JobState"] for k in ("data:finalize", "check:single")] == ["COMPLETED"] * 2
    assert job_state(ids["data:finalize"])["Dependency"] in ("(null)", "")
    run = tmp_path / "run" / "data"
    assert mf.load(run).id == mf.load(local / "data").id and len(mf.load(run).files) == 6
    tasks = {json.loads(p.read_text())["task"].get("slurm_array_task_id") for p in (run / "_parts").glob("part-*.json")}
    assert tasks == {"0", "1", "2"}  # three array tasks each committed their block
    assert "is intact" in (tmp_path / "run" / "logs" / f"check-{ids['check:single']}.out").read_text()


def test_array_task_cancelled_mid_part_then_resubmitted_gives_the_local_result(slurm_cluster, tmp_path):
    stages = {"slow": fake(parts=6, sleep=3.0, array=3)}
    config = write_config(tmp_path / "cancel.yaml", tmp_path / "run", stages)
    ids = _submit(config)
    out = tmp_path / "run" / "slow"
    _wait_for(lambda: list(out.glob(".tmp-part-000003.tar*")), what="task 1 inside its second part")
    subprocess.run(["scancel", f"{ids['slow:tasks']}_1"], check=True)
    _wait_for(lambda: job_state(f"{ids['slow:tasks']}_1").get("JobState") == "CANCELLED", what="cancel")
    assert "part-000002.json" in _receipts(out) and "part-000003.json" not in _receipts(out)
    subprocess.run(["scancel", ids["slow:finalize"]], check=True)  # its afterok can never be satisfied now
    wait_jobs([ids["slow:tasks"]], timeout_s=60)
    assert not (out / "manifest.json").exists()
    again = _submit(config)
    local = _local(tmp_path, stages)
    wait_jobs(list(again.values()), timeout_s=90)
    assert array_states(again["slow:tasks"]) == ["COMPLETED"] * 3
    assert part_digests(out) == part_digests(local / "slow")
    assert mf.load(out).id == mf.load(local / "slow").id
    assert not [p for p in out.rglob(".tmp-*")]


def test_pre_timeout_signal_requeues_the_task_which_then_completes(slurm_cluster, tmp_path):
    stages = {"slow": fake(parts=4, sleep=1.5, array=1)}
    config = write_config(tmp_path / "usr1.yaml", tmp_path / "run", stages, slurm={"signal_grace_s": 60})
    ids = _submit(config)
    task = f"{ids['slow:tasks']}_0"
    out = tmp_path / "run" / "slow"
    _wait_for(lambda: _receipts(out), what="first part")
    # what --signal=B:USR1@60 does 60 s before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True)
    _wait_for(lambda: job_state(task).get("Restarts") == "1", what="requeue")
    stopped_with = len(_receipts(out))
    assert 1 <= stopped_with < 4 and not (out / "manifest.json").exists()
    # A requeued job may not start again before its old credential expires (AuthInfo=cred_expire, 5 s in the
    # test cluster) and is held until then plus a margin (~2 min); release it once the credential has expired.
    time.sleep(CRED_EXPIRE_S + 2)
    if job_state(task).get("JobState") == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    wait_jobs(list(ids.values()), timeout_s=90)
    assert job_state(task)["JobState"] == "COMPLETED" and job_state(ids["slow:finalize"])["JobState"] == "COMPLETED"
    log = (tmp_path / "run" / "logs" / f"slow-{ids['slow:tasks']}_0.out").read_text()
    assert "exit 75" in log and "requeueing job" in log and f"{stopped_with} already done" in log
    local = _local(tmp_path, stages)
    assert part_digests(out) == part_digests(local / "slow") and mf.load(out).id == mf.load(local / "slow").id


def test_duplicated_submission_one_commit_wins_per_part(slurm_cluster, tmp_path):
    stages = {"slow": fake(parts=3, sleep=1.0, array=1)}
    config = write_config(tmp_path / "dup.yaml", tmp_path / "run", stages)
    first = _submit(config)
    second = _submit(config, "--all")  # the same stage again while the first runs: same parts, same folder
    wait_jobs(list(first.values()) + list(second.values()), timeout_s=90)
    states = [job_state(j)["JobState"] for j in (*first.values(), *second.values())]
    assert states == ["COMPLETED"] * 4
    out = tmp_path / "run" / "slow"
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("slow-*_0.out"))
    assert "committed by another task meanwhile; discarded this copy" in logs
    local = _local(tmp_path, stages)
    assert part_digests(out) == part_digests(local / "slow") and mf.load(out).id == mf.load(local / "slow").id
    assert main(["verify", str(out / "manifest.json")]) == 0 and not list(out.rglob(".tmp-*"))

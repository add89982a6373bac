"""`kdpipe submit`: sbatch scripts from the config (directives, array, finalize, torchrun, dependencies, quoting),
and the rendered script's USR1 -> exit 75 -> `scontrol requeue` protocol, run with bash (no SLURM needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.cli.run import run_pipeline
from pipeline.cli.submit import load_submissions, submit
from pipeline.config import config_from_dict, load_config, stage_argv
from pipeline.errors import InputError
from tests.slurm_helpers import REPO

FAKE = {"command": "slow", "entry": "tests.fake_stage", "args": {"parts": 4, "rows": 3}}


def _cfg(tmp_path, stages, slurm=None, **top):
    raw = {"name": "demo", "run_dir": str(tmp_path / "run"), "workdir": str(REPO), "stages": stages,
           "slurm": {"partition": "gpu", "account": "proj-1", "time": "02:00:00", "mem": "8G",
                     "cpus_per_task": 4, "max_parallel": 2, "signal_grace_s": 90,
                     "preamble": "module load cuda/12\nsource /opt/venv/bin/activate", **(slurm or {})}, **top}
    return config_from_dict(raw, cwd=tmp_path)


def _directives(script: Path) -> list[str]:
    return [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]


def test_array_stage_renders_tasks_and_finalize_scripts_from_the_config(tmp_path):
    cfg = _cfg(tmp_path, {"logits": {"command": "logits", "args": {"topk": 10}, "array": 4,
                                     "slurm": {"gpus": 2, "finalize_time": "00:20:00"}}})
    jobs = submit(cfg, dry_run=True, runner=lambda argv: pytest.fail("dry run submitted"))
    assert [(j.stage, j.role, j.script.name) for j in jobs] == [
        ("logits", "tasks", "logits.sbatch"), ("logits", "finalize", "logits.finalize.sbatch")]
    run = tmp_path / "run"
    assert _directives(jobs[0].script) == [
        "#SBATCH --job-name=kdpipe-demo-logits", f"#SBATCH --output={run}/logs/logits-%A_%a.out",
        "#SBATCH --open-mode=append", "#SBATCH --partition=gpu", "#SBATCH --account=proj-1", "#SBATCH --mem=8G",
        "#SBATCH --time=02:00:00", "#SBATCH --cpus-per-task=4", "#SBATCH --gres=gpu:2", "#SBATCH --array=0-3%2",
        "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90"]
    finalize = _directives(jobs[1].script)
    assert "#SBATCH --time=00:20:00" in finalize and "#SBATCH --cpus-per-task=1" in finalize
    assert not [d for d in finalize if "--gres" in d or "--array=" in d]
    text = jobs[0].script.read_text()
    assert "module load cuda/12\nsource /opt/venv/bin/activate\n" in text
    assert f"-m pipeline logits --topk 10 --out {run}/logits --no-finalize &" in text
    assert f"-m pipeline logits --topk 10 --out {run}/logits --finalize &" in jobs[1].script.read_text()
    assert f"export KDPIPE_CONFIG_HASH={cfg.hash}" in text and os.access(jobs[0].script, os.X_OK)
    assert load_submissions(run) == []


def test_training_renders_srun_torchrun_with_one_process_per_gpu(tmp_path):
    cfg = _cfg(tmp_path, {"train": {"command": "train", "args": {"loss": "soft"}, "slurm": {"gpus": 4, "nodes": 2}}})
    (job,) = submit(cfg, dry_run=True)
    assert job.role == "torchrun"
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4"} <= set(
        _directives(job.script))
    text = job.script.read_text()
    assert "srun --kill-on-bad-exit=1 " in text and "-m torch.distributed.run --nnodes=\"$SLURM_JOB_NUM_NODES\"" in text
    assert "--nproc-per-node=4 -m pipeline train --loss soft --out" in text


def test_jobs_are_chained_with_afterok_and_recorded(tmp_path):
    cfg = _cfg(tmp_path, {"data": {"command": "ingest", "argv": ["digits"], "array": 3},
                          "side": {"command": "teacher"},
                          "logits": {"command": "logits", "args": {"data": "${data}"}, "array": 2},
                          "check": {"command": "verify", "argv": ["${logits}/manifest.json"], "out": None}})
    calls = []
    runner = lambda argv: (calls.append(argv), f"{100 + len(calls)}\n")[1]
    jobs = submit(cfg, runner=runner)
    deps = [next((a for a in argv if a.startswith("--dependency")), None) for argv in calls]
    assert [Path(argv[-1]).name for argv in calls] == [
        "data.sbatch", "data.finalize.sbatch", "side.sbatch", "logits.sbatch", "logits.finalize.sbatch",
        "check.sbatch"]
    assert deps == [None, "--dependency=afterok:101", None, "--dependency=afterok:102",
                    "--dependency=afterok:104", "--dependency=afterok:105"]
    assert all(argv[:2] == ["sbatch", "--parsable"] for argv in calls)
    (record,) = load_submissions(cfg.run_dir)
    assert [(j["stage"], j["role"], j["job_id"]) for j in record["jobs"]] == [
        (j.stage, j.role, j.job_id) for j in jobs] and record["config_hash"] == cfg.hash


def test_complete_stages_are_not_submitted_and_missing_needs_are_refused(tmp_path):
    stages = {"fake": FAKE, "check": {"command": "verify", "argv": ["${fake}/manifest.json"], "out": None}}
    cfg = _cfg(tmp_path, stages)
    with pytest.raises(InputError, match="needs fake"):
        submit(cfg, ["check"], dry_run=True)
    run_pipeline(cfg, ["fake"])
    assert [j.stage for j in submit(cfg, dry_run=True)] == ["check"]
    assert [j.stage for j in submit(cfg, dry_run=True, skip_complete=False)] == ["fake", "check"]


@pytest.mark.parametrize("slurm, message", [
    ({"partition": "gpu\n#SBATCH --uid=0"}, "newlines are not allowed"),
    ({"account": "a b"}, "only letters"),
    ({"time": "1:00:00;reboot"}, "only letters"),
])
def test_unsafe_directive_values_are_refused(tmp_path, slurm, message):
    with pytest.raises(InputError, match=message):
        submit(_cfg(tmp_path, {"fake": FAKE}, slurm), dry_run=True)


def test_every_value_in_the_script_is_shell_quoted(tmp_path):
    """The rendered command, run by bash with a python that records its argv, gets exactly the stage argv."""
    fake_python = tmp_path / "py"
    record = tmp_path / "argv.json"
    fake_python.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake_python.chmod(0o755)
    nasty = "it's $(touch PWNED) `touch PWNED2` \"q\" ; rm -rf / #"
    cfg = _cfg(tmp_path, {"s": {"command": "select", "argv": [nasty], "args": {"policy": "a b\tc", "per_class": 3},
                                "env": {"NASTY": "$(touch PWNED3)'"}, "out": "out dir with spaces"}},
               {"preamble": None}, python=str(fake_python), workdir=str(tmp_path))
    (job,) = submit(cfg, dry_run=True)
    done = subprocess.run(["bash", str(job.script)], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
    assert done.returncode == 0, done.stderr
    assert json.loads(record.read_text()) == ["-m", "pipeline", *stage_argv(cfg.stages["s"])]
    assert not list(tmp_path.glob("PWNED*"))


def _fake_scontrol(tmp_path: Path) -> tuple[dict, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": "4242"}, log


def test_script_forwards_usr1_and_requeues_itself_when_kdpipe_exits_75(tmp_path):
    cfg = _cfg(tmp_path, {"fake": {**FAKE, "args": {"parts": 4, "rows": 8, "sleep": 0.8}, "mode": "single"}},
               {"preamble": None})
    (job,) = submit(cfg, dry_run=True)
    env, log = _fake_scontrol(tmp_path)
    proc = subprocess.Popen(["bash", str(job.script)], env=env, stderr=subprocess.PIPE, text=True)
    receipts = tmp_path / "run" / "fake" / "_parts"
    stop = time.time() + 30
    while not list(receipts.glob("part-*.json")) and time.time() < stop:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@S does: the batch shell only
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert log.read_text().split() == ["requeue", "4242"] and "exit 75" in err
    assert len(list(receipts.glob("part-*.json"))) < 4 and not (tmp_path / "run/fake/manifest.json").exists()
    log.unlink()
    again = subprocess.run(["bash", str(job.script)], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and not log.exists()  # the "requeued" run completes, no requeue
    assert (tmp_path / "run/fake/manifest.json").is_file()


def test_script_passes_a_failure_exit_code_through_without_requeue(tmp_path):
    cfg = _cfg(tmp_path, {"bad": {"command": "ingest", "argv": [str(tmp_path / "missing")], "mode": "single"}},
               {"preamble": None})
    (job,) = submit(cfg, dry_run=True)
    env, log = _fake_scontrol(tmp_path)
    done = subprocess.run(["bash", str(job.script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not log.exists()


def test_submit_command_dry_run_prints_the_jobs(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"fake": FAKE}}))
    assert main(["submit", str(path), "--dry-run", "--set", "stages.fake.array=3"]) == 0
    out = capsys.readouterr().out
    assert "fake             tasks     (dry run) sbatch --parsable" in out
    assert "#SBATCH --array=0-2" in (tmp_path / "run/slurm/fake.sbatch").read_text()


def test_the_example_cluster_config_renders_a_chained_job_per_stage(tmp_path):
    example = REPO / "pipeline" / "cli" / "configs" / "example-cluster.yaml"
    cfg = load_config(example, [f"run_dir={tmp_path / 'run'}"])
    jobs = submit(cfg, dry_run=True, skip_complete=False)
    assert [j.role for j in jobs].count("finalize") == 4 and [j.role for j in jobs][-2:] == ["torchrun"] * 2
    finetune = jobs[-1]
    assert finetune.after == ["labeled:finalize", "pretrain:torchrun"]  # the stages it references

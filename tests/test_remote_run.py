"""``kdpipe run``, ``status`` and ``submit`` on outputs in object storage (moto): a config whose run_dir is an
s3:// prefix runs index -> logits -> select -> reshard into the bucket, a rerun skips every verified stage,
``status`` reads receipts and manifests from the bucket, ``submit`` passes the s3:// outputs through."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from pipeline.cli import main
from tests.s3_helpers import make_pool
from tests.test_logits_support import train_card

BUCKET = "remote-run"


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("rrun")
    make_pool(root / "pool", shards=3, samples=4, seed=5)
    card = train_card(root / "card", None, steps=0, classes=["a", "b", "c"])
    fs = s3_server.fs()
    fs.mkdir(BUCKET)
    s3_server.upload(root / "pool", f"{BUCKET}/pool")
    return root, card, fs


def _config(root, card, run_dir, **extra):
    stages = {
        "pool": {"command": "index", "argv": [f"s3://{BUCKET}/pool/"], "array": 2},
        "logits": {"command": "logits", "args": {"data": "${pool}", "teacher": str(card), "topk": 2,
                                                 "temperature": 1.0, "num_workers": 0}},
        "select": {"command": "select", "args": {"logits": "${logits}", "per_class": 3}},
        "reshard": {"command": "reshard", "args": {"selection": "${select}"}, **extra},
    }
    path = root / f"cfg-{abs(hash(run_dir))}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": run_dir, "stages": stages}, sort_keys=False))
    return path


def test_run_into_a_bucket_run_dir_then_a_rerun_skips_every_verified_stage(world, caplog, capsys):
    root, card, fs = world
    config = _config(root, card, f"s3://{BUCKET}/run1")
    assert main(["run", str(config)]) == 0
    for stage in ("pool", "logits", "select", "reshard"):
        assert fs.exists(f"{BUCKET}/run1/{stage}/manifest.json"), stage
    assert fs.exists(f"{BUCKET}/run1/config.resolved.json") and fs.exists(f"{BUCKET}/run1/select/report/counts.png")
    assert not (root / "s3:").exists()
    caplog.clear()
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/run1") if "config" not in p}
    assert main(["run", str(config)]) == 0
    assert caplog.text.count("complete and verified, skipped") == 4
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/run1") if "config" not in p} == before
    capsys.readouterr()
    assert main(["status", f"s3://{BUCKET}/run1", "--json"]) == 0
    shown = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert {s["state"] for s in shown.values()} == {"complete"}
    assert shown["pool"]["folders"][0]["committed"] == 3 and shown["pool"]["folders"][0]["total"] == 3
    assert shown["logits"]["folders"][0]["path"] == f"s3://{BUCKET}/run1/logits"
    assert main(["status", f"s3://{BUCKET}/run1/logits", "--verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_train_reads_the_training_shards_from_the_bucket(world, tmp_path):
    root, card, fs = world
    if not fs.exists(f"{BUCKET}/run1/reshard/manifest.json"):
        pytest.skip("needs the run of test_run_into_a_bucket_run_dir_then_a_rerun_skips_every_verified_stage")
    assert main(["train", "--train", f"s3://{BUCKET}/run1/reshard", "--arch", "smallcnn", "--size", "28",
                 "--epochs", "1", "--batch-size", "4", "--loss", "hard", "--threads", "1", "--num-workers", "0",
                 "--out", str(tmp_path / "student")]) == 0
    assert (tmp_path / "student" / "manifest.json").exists()


def test_status_of_a_half_done_stage_in_the_bucket_shows_its_parts(world, capsys):
    root, card, fs = world
    config = _config(root, card, f"s3://{BUCKET}/run2")
    assert main(["run", str(config), "--stages", "pool"]) == 0
    assert main(["logits", "--data", f"s3://{BUCKET}/run2/pool", "--teacher", str(card), "--topk", "2",
                 "--temperature", "1", "--num-workers", "0", "--out", f"s3://{BUCKET}/run2/logits",
                 "--task-index", "0", "--num-tasks", "3", "--no-finalize"]) == 0
    capsys.readouterr()
    assert main(["status", str(config), "--json"]) == 0
    shown = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert shown["pool"]["state"] == "complete" and shown["logits"]["state"] == "partial"
    assert shown["logits"]["folders"][0]["committed"] == 1 and shown["select"]["state"] == "not started"


def test_submit_passes_s3_outputs_through_quoted_and_refuses_a_bucket_run_dir(world, tmp_path, caplog):
    root, card, fs = world
    local = _config(root, card, str(tmp_path / "run"), out=f"s3://{BUCKET}/sub/reshard dir")
    assert main(["submit", str(local), "--dry-run"]) == 0
    script = (tmp_path / "run" / "slurm" / "reshard.sbatch").read_text()
    assert f"--out {shlex.quote(f's3://{BUCKET}/sub/reshard dir')}" in script
    remote = _config(root, card, f"s3://{BUCKET}/sub-run")
    assert main(["submit", str(remote), "--dry-run"]) == 2
    assert "`kdpipe submit` writes sbatch scripts" in caplog.text


def test_a_sweep_into_a_bucket_run_dir_is_refused_by_name(world, caplog):
    root, card, _ = world
    config = _config(root, card, f"s3://{BUCKET}/sweep")
    assert main(["sweep", str(config), "--stage", "select", "--vary", "per_class=2,3", "--dry-run"]) == 2
    assert "`kdpipe sweep` writes its plan and report into run_dir" in caplog.text

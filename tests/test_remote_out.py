"""``kdpipe logits --out s3://bucket/prefix``: parts written whole (one PUT each), receipts after them, the
manifest created only if absent; the same bytes as a local run; a killed upload leaves no committed part."""

from __future__ import annotations

import json

import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from stages.artifacts import logits_reader
from stages.artifacts.logits_reader import open_logits
from stages.artifacts.parquet import checksum
from tests.s3_helpers import make_pool
from tests.test_logits_support import train_card

BUCKET = "remote-out"


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("rout")
    make_pool(root / "pool", shards=3, samples=4, seed=3)
    card = train_card(root / "card", None, steps=0, classes=["a", "b", "c"])
    assert main(["index", str(root / "pool"), "--out", str(root / "idx")]) == 0
    s3_server.fs().mkdir(BUCKET)
    assert _logits(root, card, str(root / "local")) == 0
    return root, card, s3_server.fs()


def _logits(root, card, out, *extra):
    return main(["logits", "--data", str(root / "idx"), "--teacher", str(card), "--topk", "2", "--temperature", "1",
                 "--num-workers", "0", "--out", out, *extra])


def test_logits_to_a_bucket_prefix_equal_a_local_run_and_the_manifest_is_create_only(world):
    root, card, fs = world
    assert _logits(root, card, f"s3://{BUCKET}/run1/logits") == 0
    local = mf.load(root / "local")
    remote = json.loads(fs.cat_file(f"{BUCKET}/run1/logits/manifest.json"))
    assert remote["id"] == local.id and [f["sha256"] for f in remote["files"]] == [f["sha256"] for f in local.files]
    for f in local.files:
        assert fs.cat_file(f"{BUCKET}/run1/logits/{f['path']}") == (root / "local" / f["path"]).read_bytes()
    assert fs.exists(f"{BUCKET}/run1/logits/README.md") and fs.exists(f"{BUCKET}/run1/logits/_parts/part-000002.json")
    before = fs.info(f"{BUCKET}/run1/logits/manifest.json")["LastModified"]
    assert _logits(root, card, f"s3://{BUCKET}/run1/logits") == 0  # a rerun: every part skipped, manifest kept
    assert fs.info(f"{BUCKET}/run1/logits/manifest.json")["LastModified"] == before


def test_a_part_object_without_its_receipt_is_not_committed_and_the_rerun_completes(world):
    root, card, fs = world
    assert _logits(root, card, f"s3://{BUCKET}/run2/logits", "--no-finalize", "--task-index", "0",
                   "--num-tasks", "3") == 0
    fs.pipe_file(f"{BUCKET}/run2/logits/part-000001.parquet", b"half an upload, never receipted")
    assert not fs.exists(f"{BUCKET}/run2/logits/manifest.json")
    assert _logits(root, card, f"s3://{BUCKET}/run2/logits") == 0
    remote = json.loads(fs.cat_file(f"{BUCKET}/run2/logits/manifest.json"))
    assert remote["id"] == mf.load(root / "local").id


def test_other_parameters_in_the_same_prefix_are_refused(world, caplog):
    root, card, _ = world
    assert _logits(root, card, f"s3://{BUCKET}/run3/logits") == 0
    main(["logits", "--data", str(root / "idx"), "--teacher", str(card), "--topk", "3", "--temperature", "1",
          "--num-workers", "0", "--out", f"s3://{BUCKET}/run3/logits"])
    assert "made with other parameters" in caplog.text


@pytest.mark.parametrize("point", ["part.validated:2", "part.published:2"])
def test_a_sigkill_around_an_upload_leaves_no_committed_part_and_the_rerun_completes(world, point):
    import os
    import subprocess
    import sys

    from pipeline.objstore import ObjectPartStore

    root, card, fs = world
    prefix = f"{BUCKET}/kill-{point.split('.')[1].split(':')[0]}/logits"
    argv = [sys.executable, "-m", "pipeline", "logits", "--data", str(root / "idx"), "--teacher", str(card),
            "--topk", "2", "--temperature", "1", "--num-workers", "0", "--out", f"s3://{prefix}"]
    killed = subprocess.run(argv, env={**os.environ, "KDPIPE_FAULT": point}, capture_output=True)
    assert killed.returncode == -9
    assert fs.exists(f"{prefix}/_parts/part-000000.json") and not fs.exists(f"{prefix}/_parts/part-000001.json")
    assert not fs.exists(f"{prefix}/manifest.json")
    assert _logits(root, card, f"s3://{prefix}") == 0
    assert json.loads(fs.cat_file(f"{prefix}/manifest.json"))["id"] == mf.load(root / "local").id
    scratch = ObjectPartStore(f"s3://{prefix}", ".parquet", {"hash": ""}, len).scratch
    assert not list(scratch.glob(".tmp-*"))  # the killed writer's local temp was removed


def test_verify_of_an_artifact_in_the_bucket_re_hashes_its_objects(world, caplog):
    root, card, fs = world
    prefix = f"{BUCKET}/verify/logits"
    assert _logits(root, card, f"s3://{prefix}") == 0
    assert main(["verify", f"s3://{prefix}", "--jobs", "3"]) == 0 and "is intact" in caplog.text
    body = bytearray(fs.cat_file(f"{prefix}/part-000001.parquet"))
    body[len(body) // 2] ^= 0xFF
    fs.pipe_file(f"{prefix}/part-000001.parquet", bytes(body))
    caplog.clear()
    assert main(["verify", f"s3://{prefix}/manifest.json"]) == 1
    assert f"s3://{prefix}/part-000001.parquet: sha256 differs" in caplog.text and "intact" not in caplog.text


@pytest.fixture(scope="module")
def chain(world, s3_server):
    """index -> logits -> select -> reshard twice: all on local disk, and pool + every output in the bucket."""
    root, card, fs = world
    fs.mkdir("chain")
    s3_server.upload(root / "pool", "chain/pool")
    local, remote = str(root / "chain"), "s3://chain/run"
    for out, pool in ((local, str(root / "pool")), (remote, "s3://chain/pool/")):
        assert _chain(card, out, pool) == [0, 0, 0, 0]
    return root, fs, local, remote


def _chain(card, out, pool, *stages):
    steps = {"index": ["index", pool, "--out", f"{out}/pool"],
             "logits": ["logits", "--data", f"{out}/pool", "--teacher", str(card), "--topk", "2", "--temperature", "1",
                        "--num-workers", "0", "--out", f"{out}/logits"],
             "select": ["select", "--logits", f"{out}/logits", "--per-class", "3", "--out", f"{out}/sel"],
             "reshard": ["reshard", "--selection", f"{out}/sel", "--out", f"{out}/rs", "--keep", "txt,json"]}
    return [main(steps[name]) for name in (stages or steps)]


def test_the_whole_chain_in_a_bucket_equals_the_local_chain_id_for_id_and_part_for_part(chain):
    root, fs, local, remote = chain
    for stage in ("pool", "logits", "sel", "rs"):
        here = mf.load(f"{local}/{stage}")
        there = json.loads(fs.cat_file(f"chain/run/{stage}/manifest.json"))
        assert there["id"] == here.id, stage
        assert [f["sha256"] for f in there["files"]] == [f["sha256"] for f in here.files], stage
    for name in ("selection_report.json", "per_class.csv", "counts.png", "manifest.json"):
        assert fs.exists(f"chain/run/sel/report/{name}"), name
    report = json.loads(fs.cat_file("chain/run/sel/report/manifest.json"))
    assert report["id"] == mf.load(f"{local}/sel/report").id
    assert fs.cat_file("chain/run/rs/part-000000.tar") == (root / "chain" / "rs" / "part-000000.tar").read_bytes()
    assert main(["verify", f"{remote}/rs"]) == 0 and main(["verify", f"{remote}/sel"]) == 0
    receipt = json.loads(fs.cat_file("chain/run/logits/_parts/part-000000.json"))  # no class-name list in it
    assert set(receipt["fingerprint"]) == {"hash", "stage", "code_version"} and receipt["samples_per_s"] > 0
    assert fs.exists(f"chain/run/logits/_parts/_fingerprint-{receipt['fingerprint']['hash']}.json")


def test_a_rerun_of_the_chain_in_the_bucket_changes_no_object(chain):
    root, fs, local, remote = chain
    before = {p: fs.info(p)["ETag"] for p in fs.find("chain/run")}
    assert _chain(root / "card", remote, "s3://chain/pool/", "select", "reshard") == [0, 0]
    assert {p: fs.info(p)["ETag"] for p in fs.find("chain/run")} == before


@pytest.mark.parametrize("point", ["part.validated:1", "part.published:1"])
def test_a_sigkill_around_a_reshard_upload_leaves_no_committed_part_and_the_rerun_completes(chain, point):
    import os
    import subprocess
    import sys

    root, fs, local, remote = chain
    prefix = f"chain/kill-{point.split('.')[1].split(':')[0]}/rs"
    argv = [sys.executable, "-m", "pipeline", "reshard", "--selection", f"{remote}/sel", "--out", f"s3://{prefix}",
            "--keep", "txt,json", "--shard-size", "2"]
    killed = subprocess.run(argv, env={**os.environ, "KDPIPE_FAULT": point}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not fs.exists(f"{prefix}/_parts/part-000000.json") and not fs.exists(f"{prefix}/manifest.json")
    assert main(["reshard", "--selection", f"{remote}/sel", "--out", f"s3://{prefix}", "--keep", "txt,json",
                 "--shard-size", "2"]) == 0
    rerun = json.loads(fs.cat_file(f"{prefix}/manifest.json"))
    assert rerun["totals"]["samples"] == mf.load(f"{local}/rs").totals["samples"] and len(rerun["files"]) > 1
    assert main(["verify", f"s3://{prefix}"]) == 0


def test_select_in_two_map_tasks_with_a_gallery_in_the_bucket_equals_one_local_task(chain):
    root, fs, local, remote = chain
    argv = ["select", "--logits", f"{remote}/logits", "--per-class", "3", "--gallery", "1",
            "--out", "s3://chain/two/sel", "--num-tasks", "2"]
    assert main([*argv, "--task-index", "0"]) == 0 and not fs.exists("chain/two/sel/manifest.json")
    assert fs.exists("chain/two/sel/_map/tasks-2/_parts/part-000000.json")
    assert main([*argv, "--task-index", "1"]) == 0
    there = json.loads(fs.cat_file("chain/two/sel/manifest.json"))
    assert there["id"] == mf.load(f"{local}/sel").id
    report = json.loads(fs.cat_file("chain/two/sel/report/manifest.json"))
    gallery = [f["path"] for f in report["files"] if f["path"] not in ("selection_report.json", "per_class.csv",
                                                                      "counts.png", "scores.png")]
    assert gallery and all(fs.exists(f"chain/two/sel/report/{name}") for name in gallery)


def test_a_sigkill_in_the_middle_of_a_part_upload_leaves_no_object_and_the_rerun_completes(chain, s3_server):
    import os
    import subprocess
    import sys

    from tests.s3_proxy import KillingProxy

    root, fs, local, remote = chain
    prefix = "chain/kill-mid/rs"
    proxy = KillingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), "rs/part-000001.tar")
    argv = [sys.executable, "-m", "pipeline", "reshard", "--selection", f"{remote}/sel", "--out", f"s3://{prefix}",
            "--keep", "txt,json", "--shard-size", "2"]
    proc = subprocess.Popen(argv, env={**os.environ, "AWS_ENDPOINT_URL": proxy.url}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    proxy.pid = proc.pid
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    proxy.close()
    assert proxy.killed.is_set() and proc.returncode == -9, err.decode()[-2000:]
    assert fs.exists(f"{prefix}/_parts/part-000000.json")  # part 0 went up whole before
    assert not fs.exists(f"{prefix}/part-000001.tar") and not fs.exists(f"{prefix}/_parts/part-000001.json")
    assert main(argv[3:]) == 0
    assert json.loads(fs.cat_file(f"{prefix}/manifest.json"))["totals"]["samples"] == \
        mf.load(f"{local}/rs").totals["samples"]
    assert main(["verify", f"s3://{prefix}"]) == 0


def test_a_logits_part_in_a_bucket_is_hashed_every_time_it_is_opened(world, monkeypatch):
    """A local part is hashed once per file (inode, size, mtime); an object has no such stat, so select's second
    pass hashes it again: a same-size object replaced between the passes is caught."""
    root, card, _ = world
    assert _logits(root, card, f"s3://{BUCKET}/hashed/logits") == 0
    hashed = []
    monkeypatch.setattr(logits_reader, "checksum", lambda path: hashed.append(str(path)) or checksum(path))
    for where in (str(root / "local"), f"s3://{BUCKET}/hashed/logits"):
        logits = open_logits(where)
        logits.open_part(0)
        logits.open_part(0)
    assert [h.startswith("s3://") for h in hashed] == [False, True, True]

"""The pool where it lives: index + logits over shards in an S3 server (moto) and over http give the same logits
parts, byte for byte, as over the local copies; a flipped byte in a remote shard fails its part by name."""

from __future__ import annotations

import tarfile

import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from tests.s3_helpers import make_pool
from tests.test_logits_support import train_card

BUCKET = "remote-pool"


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server, http_server):
    root = tmp_path_factory.mktemp("remote")
    make_pool(root / "pool", shards=3, samples=5, seed=7)
    s3_server.fs().mkdir(BUCKET)
    s3_server.upload(root / "pool", f"{BUCKET}/pool")
    http_root, base = http_server
    (http_root / "rpool").mkdir()
    for path in (root / "pool").iterdir():
        (http_root / "rpool" / path.name).write_bytes(path.read_bytes())
    card = train_card(root / "card", None, steps=0, classes=["a", "b", "c"])
    return root, card, base, s3_server


def _index_and_logits(root, name, *src):
    assert main(["index", *src, "--out", str(root / f"{name}-idx")]) == 0
    rc = main(["logits", "--data", str(root / f"{name}-idx"), "--teacher", str(root / "card"), "--topk", "2",
               "--temperature", "1", "--num-workers", "0", "--out", str(root / f"{name}-logits")])
    return rc, root / f"{name}-logits"


def test_logits_over_s3_and_http_equal_the_local_pool_byte_for_byte(world):
    root, _, base, _ = world
    results = {name: _index_and_logits(root, name, src) for name, src in [
        ("local", str(root / "pool")), ("s3", f"s3://{BUCKET}/pool/*.tar"),
        ("http", f"{base}/rpool/{{00000..00002}}.tar")]}
    assert {rc for rc, _ in results.values()} == {0}
    manifests = {name: mf.load(out, kind="logits") for name, (_, out) in results.items()}
    shas = {name: [f["sha256"] for f in m.files] for name, m in manifests.items()}
    assert shas["s3"] == shas["local"] == shas["http"] and len(shas["local"]) == 3
    assert manifests["s3"].id == manifests["local"].id and manifests["s3"].totals["rows"] == 15


def test_a_flipped_byte_in_a_remote_shard_fails_its_part_by_name(world, caplog):
    root, _, _, server = world
    fs = server.fs()
    fs.mkdir("flip-pool")
    server.upload(root / "pool", "flip-pool/pool")
    assert main(["index", "s3://flip-pool/pool/", "--out", str(root / "flip-idx")]) == 0
    with tarfile.open(root / "pool" / "00001.tar") as tar:
        spot = tar.getmembers()[0].offset_data + 40  # inside the first image: the tar still parses
    data = bytearray((root / "pool" / "00001.tar").read_bytes())
    data[spot] ^= 0xFF
    fs.pipe("flip-pool/pool/00001.tar", bytes(data))
    rc = main(["logits", "--data", str(root / "flip-idx"), "--teacher", str(root / "card"), "--topk", "2",
               "--temperature", "1", "--num-workers", "0", "--out", str(root / "flip-logits")])
    assert rc == 1 and not (root / "flip-logits" / "manifest.json").exists()
    assert "part-000001 failed (checksum_mismatch): s3://flip-pool/pool/00001.tar: sha256" in caplog.text
    assert sorted(p.name for p in (root / "flip-logits").glob("part-*")) == ["part-000000.parquet",
                                                                             "part-000002.parquet"]


def _chain_tail(root, name):
    assert main(["select", "--logits", str(root / f"{name}-logits"), "--per-class", "3",
                 "--out", str(root / f"{name}-sel")]) == 0
    assert main(["reshard", "--selection", str(root / f"{name}-sel"), "--out", str(root / f"{name}-rs")]) == 0
    return mf.load(root / f"{name}-sel"), mf.load(root / f"{name}-rs")


def test_select_and_reshard_over_the_bucket_equal_the_local_chain_and_keep_carries_captions(world):
    root = world[0]
    for name in ("local", "s3"):
        if not (root / f"{name}-logits" / "manifest.json").exists():
            pytest.skip("needs the logits of test_logits_over_s3_and_http_equal_the_local_pool_byte_for_byte")
    (sel_l, rs_l), (sel_s, rs_s) = _chain_tail(root, "local"), _chain_tail(root, "s3")
    assert sel_l.id == sel_s.id and rs_l.id == rs_s.id
    assert [f["sha256"] for f in rs_l.files] == [f["sha256"] for f in rs_s.files]
    kept_out = root / "keep-rs"
    assert main(["reshard", "--selection", str(root / "s3-sel"), "--out", str(kept_out), "--keep", "txt,json"]) == 0
    with tarfile.open(kept_out / "part-000000.tar") as tar:
        names = tar.getnames()
        caption = tar.extractfile(next(n for n in names if n.endswith(".txt"))).read()
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "cls", "json", "txt", "src.json"}
    assert caption.startswith(b"photo ")


def test_kdpipe_run_takes_the_bucket_pool_through_index_logits_select_reshard_train(world, tmp_path):
    import yaml

    root, card, _, _ = world
    stages = {
        "pool": {"command": "index", "argv": [f"s3://{BUCKET}/pool/"], "array": 2},
        "logits": {"command": "logits", "args": {"data": "${pool}", "teacher": str(card), "topk": 2,
                                                 "temperature": 1.0, "num_workers": 0}},
        "select": {"command": "select", "args": {"logits": "${logits}", "per_class": 3}},
        "reshard": {"command": "reshard", "args": {"selection": "${select}", "keep": "txt,json"}},
        "student": {"command": "train", "args": {"train": "${reshard}", "arch": "smallcnn", "size": 28, "epochs": 1,
                                                 "batch_size": 4, "loss": "hard", "threads": 1, "num_workers": 0}},
    }
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": stages}, sort_keys=False))
    assert main(["run", str(path)]) == 0
    pool = mf.load(tmp_path / "run" / "pool")
    assert pool.files[0]["path"] == f"s3://{BUCKET}/pool/00000.tar" and pool.totals["samples"] == 15
    assert mf.load(tmp_path / "run" / "reshard").totals["samples"] > 0
    assert (tmp_path / "run" / "student" / "manifest.json").exists()
    assert not list((tmp_path / "run").rglob("0000*.tar"))  # no copy of the pool anywhere

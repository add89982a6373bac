"""``kdpipe index``: img2dataset-shaped pools (tars + .parquet + _stats.json) indexed in place, from a folder, a
``{a..b}`` pattern, a list file, http(s) and s3 URLs; exact counts, named failures, array tasks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from stages.shardio import ShardStats, fast_members, read_shard, tar_members
from tests.s3_helpers import make_pool, write_img2dataset_shard


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    make_pool(root / "pool", shards=3, samples=5)
    return root / "pool"


def _index(tmp_path, *src, name="idx", extra=()):
    out = tmp_path / name
    rc = main(["index", *map(str, src), "--out", str(out), *extra])
    return rc, out


def _counts(out):
    manifest = mf.load(out, kind="dataset")
    return manifest, [(f["path"].rsplit("/", 1)[-1], f["samples"]) for f in manifest.files]


def test_a_folder_indexes_its_tars_in_place_and_skips_parquet_and_stats(pool, tmp_path):
    rc, out = _index(tmp_path, pool)
    manifest, counts = _counts(out)
    assert rc == 0 and counts == [("00000.tar", 5), ("00001.tar", 5), ("00002.tar", 5)]
    assert manifest.totals["samples"] == 15 and manifest.params == {
        "labeled": False, "source": "index", "split": None, "label_from": None}
    assert all(f["external"] and f["path"] == str(pool / p) and f["image_ext"] == "jpg"
               for f, (p, _) in zip(manifest.files, counts))
    assert not list(out.glob("*.tar"))  # the manifest's folder holds no data


def test_a_brace_pattern_and_a_list_file_give_exact_counts(pool, tmp_path):
    rc, out = _index(tmp_path, f"{pool}/{{00000..00001}}.tar")
    assert rc == 0 and _counts(out)[1] == [("00000.tar", 5), ("00001.tar", 5)]
    listing = pool.parent / "shards.txt"
    listing.write_text("# my pool\npool/00002.tar\n\npool/00000.tar\n")
    rc, out = _index(tmp_path, listing, name="idx2")
    assert rc == 0 and _counts(out)[1] == [("00002.tar", 5), ("00000.tar", 5)]


def test_http_and_s3_urls_index_to_the_same_id_as_the_local_pool(pool, tmp_path, http_server, s3_server):
    root, base = http_server
    (root / "pool").mkdir(exist_ok=True)
    for path in pool.iterdir():
        (root / "pool" / path.name).write_bytes(path.read_bytes())
    s3_server.fs().mkdir("idx-pool")
    s3_server.upload(pool, "idx-pool/pool")
    local = mf.load(_index(tmp_path, pool)[1])
    rc_http, http_out = _index(tmp_path, f"{base}/pool/{{00000..00002}}.tar", name="http")
    rc_s3, s3_out = _index(tmp_path, "s3://idx-pool/pool/", name="s3")
    assert rc_http == rc_s3 == 0
    assert _counts(http_out)[1] == _counts(s3_out)[1] == _counts(tmp_path / "idx")[1]
    assert mf.load(s3_out).files[0]["path"] == "s3://idx-pool/pool/00000.tar"
    assert mf.load(http_out).id == mf.load(s3_out).id == local.id  # the pool's content, wherever it lives


def test_a_sample_without_image_is_counted_not_a_row(tmp_path):
    write_img2dataset_shard(tmp_path / "p", 0, 4, np.random.default_rng(1), no_image=2)
    rc, out = _index(tmp_path, tmp_path / "p")
    manifest = mf.load(out)
    assert rc == 0 and manifest.files[0]["samples"] == 6 and manifest.files[0]["no_image"] == 2
    assert manifest.totals["samples"] == 4 and manifest.totals["failures"] == {"no_image": 2}


def _rewrite(path, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def test_repeated_keys_truncated_tars_and_stats_disagreement_fail_their_shard_by_name(tmp_path, caplog):
    folder = tmp_path / "p"
    for shard in range(4):
        write_img2dataset_shard(folder, shard, 3, np.random.default_rng(shard))
    _rewrite(folder / "00000.tar", [("a.jpg", b"x"), ("b.jpg", b"y"), ("a.txt", b"again")])
    with tarfile.open(folder / "00001.tar") as tar:
        cut = tar.getmembers()[3].offset_data + 10  # inside the second sample's image
    (folder / "00001.tar").write_bytes((folder / "00001.tar").read_bytes()[:cut])
    (folder / "00002_stats.json").write_text(json.dumps({"count": 4, "successes": 2}))
    rc, out = _index(tmp_path, folder)
    text = caplog.text
    assert rc == 1 and not (out / "manifest.json").exists()
    assert "00000.tar: key 'a' appears twice" in text and "duplicate_key" in text
    assert "00001.tar: unreadable or truncated tar" in text
    assert "00002.tar: holds 3 samples with an image, but" in text and "successes=2" in text
    assert "00003" not in text  # the good shard is indexed


def test_labels_from_a_json_field_with_a_classes_file(tmp_path):
    write_img2dataset_shard(tmp_path / "p", 0, 6, np.random.default_rng(3))
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    rc, out = _index(tmp_path, tmp_path / "p", extra=["--label-from", "json:label", "--classes",
                                                       str(tmp_path / "classes.txt")])
    manifest = mf.load(out)
    assert rc == 0 and manifest.params["labeled"] and manifest.params["class_names"] == ["cat", "dog", "bird"]
    assert sum(manifest.totals["per_class"]) == 6 and manifest.params["label_from"] == "json:label"
    labels = [json.loads(f["json"])["label"] for _, f in read_shard(str(tmp_path / "p" / "00000.tar"),
                                                                      ShardStats("x"))]
    assert manifest.totals["per_class"] == [labels.count(c) for c in range(3)]
    assert main(["teacher", "--train", str(out), "--arch", "smallcnn", "--size", "28", "--epochs", "1",
                 "--batch-size", "3", "--threads", "1", "--num-workers", "0", "--out", str(tmp_path / "t")]) == 0
    assert mf.load(tmp_path / "t").params["class_names"] == ["cat", "dog", "bird"]  # json labels, trained on


def test_array_tasks_index_blocks_and_the_last_one_finalizes_the_same_manifest(pool, tmp_path):
    single = mf.load(_index(tmp_path, pool, name="one")[1])
    rc0, out = _index(tmp_path, pool, name="arr", extra=["--task-index", "0", "--num-tasks", "2"])
    assert rc0 == 0 and not (out / "manifest.json").exists() and len(list((out / "_parts").glob("part-*"))) == 2
    rc1, _ = _index(tmp_path, pool, name="arr", extra=["--task-index", "1", "--num-tasks", "2"])
    assert rc1 == 0 and mf.load(out).id == single.id


def test_bad_sources_are_named_with_rc_2(pool, tmp_path, caplog):
    assert _index(tmp_path, pool / "00000.parquet")[0] == 2 and "not a shard" in caplog.text
    assert _index(tmp_path, "pipe:curl http://x/a.tar")[0] == 2 and "refused" in caplog.text
    assert _index(tmp_path, tmp_path / "missing")[0] == 2 and "no such shard" in caplog.text
    (tmp_path / "empty").mkdir()
    assert _index(tmp_path, tmp_path / "empty")[0] == 2 and "no .tar shard found" in caplog.text


def _names(members):
    return [(m["fname"], m["data"]) for m in members]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_member_scanner_reads_what_tarfile_reads(tmp_path, fmt):
    names = ["a.jpg", "d/" * 60 + "long.jpg", "ünï/cödé.txt", "__meta__", "x" * 120 + ".json", "empty.cls"]
    names = [n for n in names if fmt != tarfile.USTAR_FORMAT or not n.startswith("xxx")]  # ustar: 100-char names
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (i * 700) if name != "empty.cls" else b""
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    with open(path, "rb") as a, open(path, "rb") as b:
        assert _names(fast_members(a)) == _names(tar_members(b))
    with open(path, "rb") as a:
        wanted = [m["data"] for m in fast_members(a, want=lambda n: n.endswith(".txt"))]
    assert wanted[:3] == [None, None, b"\x02" * 1400]
    cut = path.read_bytes()[:2000]
    with pytest.raises(tarfile.ReadError):
        list(fast_members(io.BytesIO(cut)))


def test_index_options_are_stated_once_in_the_dataclass():
    import dataclasses
    import inspect

    from pipeline.cli import build_parser
    from pipeline.options import TaskOptions, from_args
    from stages.index.options import IndexOptions
    from stages.index.stage import index

    params = inspect.signature(index).parameters
    for field in dataclasses.fields(IndexOptions):
        assert params[field.name].default is field.default
    args = build_parser().parse_args(["index", "pool", "--out", "O"])
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(IndexOptions))
    assert from_args(IndexOptions, args) == IndexOptions() and from_args(TaskOptions, args) == TaskOptions()


def test_an_unreadable_remote_shard_fails_by_name(pool, tmp_path, http_server, caplog):
    root, base = http_server
    (root / "half").mkdir(exist_ok=True)
    (root / "half" / "00000.tar").write_bytes((pool / "00000.tar").read_bytes())
    rc, out = _index(tmp_path, f"{base}/half/{{00000..00001}}.tar")
    assert rc == 1 and not (out / "manifest.json").exists()
    assert f"part-000001 failed (unreadable_shard): {base}/half/00001.tar: cannot read the shard" in caplog.text

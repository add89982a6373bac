"""Ingest: bundled digits, labeled and flat folders -> shards + dataset manifest that `verify` checks."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError
from stages.ingest.sources import make_key
from stages.ingest.stage import assign_splits, parse_split, plan_shards
from stages.shardio import ShardStats, read_shard


def _png(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (color, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert main(["ingest", "digits", "--out", str(out), "--shard-size", "500"]) == 0
    return out


def test_digits_sample_count_equals_the_source_and_verify_passes(digits):
    manifest = mf.load(digits / "manifest.json", kind="dataset")
    assert manifest.totals["samples"] == 1797 and [f["samples"] for f in manifest.files] == [500, 500, 500, 297]
    assert manifest.params["class_names"] == [str(d) for d in range(10)] and manifest.params["labeled"]
    assert main(["verify", str(digits / "manifest.json")]) == 0


def test_flipping_one_byte_makes_verify_fail_naming_that_shard(digits, tmp_path, caplog):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in digits.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    data = bytearray((copy / "part-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (copy / "part-000002.tar").write_bytes(bytes(data))
    assert main(["verify", str(copy / "manifest.json")]) == 1
    assert "part-000002.tar: sha256 differs" in caplog.text and "part-000001.tar" not in caplog.text


def test_shards_hold_original_bytes_and_labels(digits):
    stats = ShardStats("x")
    samples = list(read_shard(digits / "part-000000.tar", stats))
    key, fields = samples[3]
    assert key == "digits-00003" and fields["png"].startswith(b"\x89PNG") and fields["cls"] == b"3"
    assert stats.failed == 0 and len(samples) == 500


def test_rerun_is_byte_identical_and_skips_done_parts(digits, tmp_path):
    assert main(["ingest", "digits", "--out", str(tmp_path), "--shard-size", "500"]) == 0
    for name in ("part-000000.tar", "part-000003.tar"):
        assert (tmp_path / name).read_bytes() == (digits / name).read_bytes()
    assert mf.load(tmp_path).id == mf.load(digits).id
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["ingest", "digits", "--out", str(tmp_path), "--shard-size", "500"]) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes


def test_split_is_deterministic_stratified_and_hides_unlabeled_labels(tmp_path):
    spec = "labeled=3/class,test=500,unlabeled=rest"
    assert main(["ingest", "digits", "--out", str(tmp_path), "--split", spec, "--shard-size", "400"]) == 0
    labeled, test, unlabeled = (mf.load(tmp_path / s) for s in ("labeled", "test", "unlabeled"))
    assert (labeled.totals["samples"], test.totals["samples"], unlabeled.totals["samples"]) == (30, 500, 1267)
    assert not unlabeled.params["labeled"] and unlabeled.params["class_names"] == []
    stats = ShardStats("u")
    assert all("cls" not in f for _, f in read_shard(tmp_path / "unlabeled" / "part-000000.tar", stats))
    hidden = pq.read_table(tmp_path / "_hidden" / "unlabeled-labels.parquet")
    assert hidden.num_rows == 1267
    labels = [int(f["cls"]) for _, f in read_shard(tmp_path / "labeled" / "part-000000.tar", ShardStats("l"))]
    assert sorted(labels) == sorted(list(range(10)) * 3)


def test_assign_splits_table():
    labels = [0, 0, 0, 1, 1, 1, 1, 1]
    got = assign_splits(labels, parse_split("a=1/class,b=2,c=rest"), seed=0)
    assert sorted(labels[i] for i in got["a"]) == [0, 1]
    assert len(got["b"]) == 2 and len(got["c"]) == 4
    assert sorted(got["a"] + got["b"] + got["c"]) == list(range(8))
    assert got == assign_splits(labels, parse_split("a=1/class,b=2,c=rest"), seed=0)


@pytest.mark.parametrize("spec", ["a=", "a=1,a=2", "a=x/class", "=3"])
def test_bad_split_specs_are_named(spec):
    with pytest.raises(InputError, match="split"):
        parse_split(spec)


@pytest.mark.parametrize("sizes, count, nbytes, expected", [
    ([1, 1, 1, 1, 1], 2, 100, [range(0, 2), range(2, 4), range(4, 5)]),
    ([60, 60, 10, 10], 10, 100, [range(0, 1), range(1, 4)]),
    ([500, 1], 10, 100, [range(0, 1), range(1, 2)]),  # an oversized item gets a shard of its own
    ([], 10, 100, []),
])
def test_plan_shards_rolls_over_by_count_and_bytes(sizes, count, nbytes, expected):
    assert plan_shards(sizes, count, nbytes) == expected


def test_labeled_folder_keeps_bytes_and_counts_non_images(tmp_path, caplog):
    src = tmp_path / "src"
    for cls, color in (("cat", 10), ("dog", 200)):
        (src / cls).mkdir(parents=True)
        (src / cls / "a.v2.png").write_bytes(_png(color))
    (src / "dog" / "notes.txt").write_text("not an image")
    assert main(["ingest", str(src), "--out", str(tmp_path / "out")]) == 0
    manifest = mf.load(tmp_path / "out")
    assert manifest.totals == {"samples": 2, "failures": {"not_an_image": 1}, "classes": 2}
    samples = dict(read_shard(tmp_path / "out" / "part-000000.tar", ShardStats("x")))
    assert samples["dog/a_v2"]["png"] == _png(200) and samples["dog/a_v2"]["cls"] == b"1"
    assert "notes.txt" in caplog.text


def test_duplicate_keys_are_a_named_error(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(1))
    (tmp_path / "x.jpg").write_bytes(_png(2))
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(InputError, match=r"duplicate key 'x'.*x.jpg.*x.png"):
        from stages.ingest.stage import ingest
        ingest(str(tmp_path), tmp_path / "o2")


def test_missing_source_is_a_named_error(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        from stages.ingest.stage import ingest
        ingest(str(tmp_path / "nope"), tmp_path / "o")


@pytest.mark.parametrize("relative, key", [("a/b.jpg", "a/b"), ("img.v2.jpg", "img_v2"), ("../x.png", "__/x"),
                                           ("we ird$.png", "we_ird_")])
def test_keys_are_safe(relative, key):
    assert make_key(relative) == key

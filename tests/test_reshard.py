"""Reshard: exact row accounting, sample content = logits rows, byte-identical reruns and task splits, lineage."""

import json
import shutil

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import ManifestError
from stages.artifacts.logits_reader import open_logits
from stages.ingest.stage import ingest
from stages.reshard.plan import plan_output_shards, plan_waves, sample_key
from stages.reshard.stage import iter_training_samples, reshard
from stages.shardio import ShardStats, read_shard
from tests.factories import make_logits, make_selection


def _shard_samples(dataset):
    out = []
    for entry in dataset.files:
        path = dataset.file_path(entry)
        out.append(list(read_shard(path, ShardStats(str(path)))))
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """digits pool (6 shards of 40) -> synthetic logits with the real keys and dataset id -> selection."""
    root = tmp_path_factory.mktemp("reshard")
    made = ingest("digits", root / "data", shard_size=40, split="pool=240,rest=rest", seed=0)
    dataset = mf.load(made["pool"], kind="dataset")
    rng = np.random.default_rng(0)
    shards = [([k for k, _ in samples], rng.normal(size=(len(samples), 10)).astype(np.float32) * 3)
              for samples in _shard_samples(dataset)]
    logits = make_logits(root / "logits", shards, topk=4, temperature=2.0, data=dataset.path)
    return {"root": root, "dataset": dataset, "logits": logits, "shards": shards, "data_root": root / "data"}


@pytest.fixture(scope="module")
def selection(chain):
    extra = [{"key": chain["shards"][2][0][5], "shard": 2, "label": 7, "score": 0.01},   # a second class
             {"key": chain["shards"][2][0][5], "shard": 2, "label": 7, "score": 0.01, "dup": 1},  # balance copy
             {"key": "digits-missing", "shard": 3, "label": 1, "score": 0.5}]           # not in its shard
    return make_selection(chain["root"] / "selection", chain["logits"], per_class=6, extra_rows=extra)


@pytest.fixture(scope="module")
def resharded(chain, selection):
    result = reshard(selection, chain["root"] / "train", shard_size=25, seed=3)
    assert result.report.exit_code == 0 and result.manifest is not None
    return result.manifest


@pytest.mark.parametrize("counts, sizes, size, nbytes, expected", [
    ([5, 5, 5], [50, 50, 50], 10, 1000, [range(0, 2), range(2, 3)]),        # fill by count
    ([5, 5, 5], [50, 50, 50], 100, 120, [range(0, 2), range(2, 3)]),        # fill by bytes
    ([0, 3, 0, 0, 4, 0], [0, 9, 0, 0, 9, 0], 10, 99, [range(1, 5)]),         # empty shards are not ends
    ([30, 2, 2], [1, 1, 1], 10, 99, [range(0, 1), range(1, 3)]),            # oversize shard stays whole
    ([0, 0], [0, 0], 10, 99, []),                                            # nothing selected
    ([4, 4, 4, 4], [1, 1, 1, 1], 4, 99, [range(i, i + 1) for i in range(4)]),
])
def test_plan_groups_contiguous_source_shards(counts, sizes, size, nbytes, expected):
    plan = plan_output_shards(counts, sizes, size, nbytes)
    assert plan == expected
    covered = [s for r in plan for s in r]
    assert sorted(covered) == covered and {s for s, c in enumerate(counts) if c} <= set(covered)


@pytest.mark.parametrize("rows, parts, budget, expected", [
    ([3, 3, 3, 3], [0, 1, 2, 3], 6, [[0, 1], [2, 3]]),
    ([3, 9, 3], [0, 1, 2], 5, [[0], [1], [2]]),        # a part over budget is a wave of its own
    ([1, 1, 1, 1], [2, 3], 10, [[2, 3]]),
    ([1], [], 10, []),
])
def test_waves_bound_rows_in_memory(rows, parts, budget, expected):
    assert plan_waves(rows, parts, budget) == expected


def test_every_selected_row_lands_once_or_is_a_named_failure(chain, selection, resharded):
    out = mf.load(resharded, kind="dataset")
    sel = mf.load(selection, kind="selection")
    assert out.totals["samples"] + sum(out.totals["failures"].values()) == sel.totals["rows"] == 6 * 10 + 3
    assert out.totals["failures"] == {"missing_key": 1}
    receipts = [json.loads(p.read_text()) for p in sorted((resharded.parent / "_parts").glob("part-*.json"))]
    assert [k for r in receipts for k in r["failures"].get("missing_key", [])] == ["digits-missing__l1"]
    keys = [key for key, _ in iter_training_samples(resharded)]
    assert len(keys) == len(set(keys)) == out.totals["samples"]
    twice = chain["shards"][2][0][5]
    assert {f"{twice}__l7", f"{twice}__l7__d1"} <= set(keys)
    assert out.params["source"] == "reshard" and out.params["soft_targets"]["temperature"] == 2.0
    assert [i["role"] for i in out.inputs] == ["selection", "data"]
    assert sum(out.totals["per_class"]) == out.totals["samples"]
    assert main(["verify", str(resharded)]) == 0


def test_samples_carry_original_bytes_label_and_their_logits_row(chain, resharded):
    originals = {key: fields for shard in _shard_samples(chain["dataset"]) for key, fields in shard}
    logits = open_logits(chain["logits"])
    rows = {r["key"]: r for i in range(logits.num_parts) for r in logits.read_part(i).to_pylist()}
    for key, fields in iter_training_samples(resharded):
        meta = json.loads(fields["json"])
        source = originals[meta["source_key"]]
        assert fields["png"] == source["png"] and key.startswith(meta["source_key"] + "__l" + fields["cls"].decode())
        row = rows[meta["source_key"]]
        assert meta["topk_index"] == row["topk_index"] and meta["lse"] == row["lse"]
        assert np.array_equal(np.float32(meta["topk_logit"]), np.float32(row["topk_logit"]))
        assert meta["temperature"] == 2.0 and meta["source_shard"] == row["shard"]


def test_output_shards_mix_classes_and_read_source_shards_in_runs(resharded):
    out = mf.load(resharded, kind="dataset")
    assert len(out.files) > 1 and all(f["samples"] <= 25 for f in out.files)
    receipts = [json.loads(p.read_text()) for p in sorted((resharded.parent / "_parts").glob("part-*.json"))]
    runs = [r["input"]["source_shards"] for r in receipts]
    flat = [s for run in runs for s in run]
    assert flat == sorted(set(flat))                 # each source shard read by exactly one part, in order
    first = [int(fields["cls"]) for _, fields in list(iter_training_samples(resharded))[:25]]
    assert first != sorted(first) and len(set(first)) > 3


def test_three_tasks_and_a_rerun_are_byte_identical_to_one_task(chain, selection, resharded, tmp_path):
    for index in range(3):
        result = reshard(selection, tmp_path / "three", shard_size=25, seed=3, task_index=index, num_tasks=3)
    assert result.manifest is not None
    again = reshard(selection, chain["root"] / "train", shard_size=25, seed=3)
    assert again.report.skipped and not again.report.committed
    one, three = mf.load(resharded), mf.load(result.manifest)
    assert one.id == three.id
    for entry in one.files:
        assert (tmp_path / "three" / entry["path"]).read_bytes() == (resharded.parent / entry["path"]).read_bytes()


def test_other_seed_gives_another_order_of_the_same_samples(selection, resharded, tmp_path):
    other = reshard(selection, tmp_path / "seed4", shard_size=25, seed=4).manifest
    a = [k for k, _ in iter_training_samples(resharded)]
    b = [k for k, _ in iter_training_samples(other)]
    assert a != b and sorted(a) == sorted(b)


def test_targets_come_from_the_logits_when_the_selection_lacks_them(chain, resharded, tmp_path):
    bare = make_selection(tmp_path / "bare", chain["logits"], per_class=6, soft_targets=False)
    out = reshard(bare, tmp_path / "out", shard_size=25, seed=3).manifest
    with_cols = {k: f["json"] for k, f in iter_training_samples(resharded)}
    for key, fields in iter_training_samples(out):
        assert fields["json"] == with_cols[key]


def test_data_of_another_dataset_is_refused_naming_both(chain, selection, tmp_path):
    other = chain["data_root"] / "rest" / "manifest.json"
    with pytest.raises(ManifestError, match="rest/manifest.json.*logits/manifest.json"):
        reshard(selection, tmp_path / "x", data=other)
    assert not (tmp_path / "x").exists()


def test_explicit_data_replaces_a_broken_lineage_path(chain, selection, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(selection.parent, moved)
    shutil.copytree(chain["logits"].parent, tmp_path / "logits")      # lineage path of data now dangles
    with pytest.raises(ManifestError, match="no such manifest"):
        reshard(moved, tmp_path / "a", shard_size=25)
    result = reshard(moved, tmp_path / "b", data=chain["dataset"].path, shard_size=25, seed=3)
    assert result.manifest is not None


def test_a_damaged_source_shard_fails_only_its_part(chain, selection, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain["dataset"].folder, data)
    victim = data / "part-000004.tar"
    victim.write_bytes(victim.read_bytes()[:-2048])
    result = reshard(selection, tmp_path / "out", data=data / "manifest.json", shard_size=25, seed=3)
    assert result.manifest is None and result.report.exit_code == 1 and len(result.report.failed) == 1
    assert result.report.committed


def test_cli_round_trip_and_verify(chain, selection, resharded, tmp_path):
    out = tmp_path / "cli"
    assert main(["reshard", "--selection", str(selection), "--out", str(out), "--shard-size", "25",
                 "--seed", "3"]) == 0
    assert mf.load(out).id == mf.load(resharded).id
    assert main(["verify", str(out / "manifest.json")]) == 0
    assert main(["reshard", "--selection", str(selection), "--out", str(tmp_path / "bad"),
                 "--data", str(chain["data_root"] / "rest" / "manifest.json")]) == 2


def test_sample_key_layout():
    assert sample_key("a/b-1", 3, 0) == "a/b-1__l3" and sample_key("x", 0, 2) == "x__l0__d2"


def test_real_logits_and_select_stages_feed_reshard(chain, tmp_path):
    """The real chain: a (random) teacher's logits, a balanced threshold selection, then reshard."""
    import torch

    from stages.artifacts.cards import write_card
    from stages.imaging import Preprocess
    from stages.logits.stage import compute_logits
    from stages.models.classifiers import build_model
    from stages.select.stage import select

    torch.manual_seed(0)
    card = write_card(tmp_path / "teacher", build_model("smallcnn", 10), arch="smallcnn",
                      class_names=[str(d) for d in range(10)], preprocess=Preprocess(size=16), stage="test")
    logits = compute_logits(chain["dataset"].path, card, tmp_path / "logits", topk=3, temperature=2.0,
                            num_workers=0)
    sel = select(logits, tmp_path / "sel", per_class=300, policy="threshold", balance=True, soft_targets=True)
    out = reshard(sel, tmp_path / "train", shard_size=50, seed=0).manifest
    rows = {r["key"]: r for r in open_logits(logits).read_part(0).to_pylist()}
    rows.update({r["key"]: r for i in range(1, 6) for r in open_logits(logits).read_part(i).to_pylist()})
    samples = list(iter_training_samples(out))
    assert len(samples) == mf.load(sel).totals["rows"] == mf.load(out).totals["samples"]
    assert any("__d" in key for key, _ in samples)                      # balance copies became samples
    for key, fields in samples:
        meta = json.loads(fields["json"])
        row = rows[meta["source_key"]]
        assert meta["topk_index"] == row["topk_index"] and int(fields["cls"]) == row["topk_index"][0]
        assert np.array_equal(np.float16(meta["topk_logit"]), np.float16(row["topk_logit"]))
    assert main(["verify", str(out)]) == 0


def test_undecodable_and_imageless_samples_are_counted_failures(tmp_path):
    import io

    from PIL import Image

    from pipeline.hashing import sha256_file
    from stages.shardio import write_shard

    good = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(good, format="PNG")
    truncated = good.getvalue()[:30]
    samples = [{"__key__": "ok", "png": good.getvalue()}, {"__key__": "cut", "png": truncated},
               {"__key__": "junk", "png": b"not an image at all"}, {"__key__": "bare", "txt": b"no image"}]
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "s0.tar", iter(samples))
    entry = {"path": "s0.tar", "bytes": (data / "s0.tar").stat().st_size, "sha256": sha256_file(data / "s0.tar"),
             "samples": 4}
    mf.write(mf.build("dataset", stage="test", params={"labeled": False, "class_names": [], "num_classes": 0},
                      files=[entry], totals={"samples": 4}), data)
    logits = make_logits(tmp_path / "logits", [(["ok", "cut", "junk", "bare"], np.eye(4, dtype=np.float32))],
                         topk=2, data=data / "manifest.json")
    selection = make_selection(tmp_path / "sel", logits, per_class=1)
    sniffed = mf.load(reshard(selection, tmp_path / "sniff").manifest)
    assert sniffed.totals["samples"] == 2 and sniffed.totals["failures"] == {"missing_image": 1, "not_an_image": 1}
    decoded = mf.load(reshard(selection, tmp_path / "decode", decode_check=True).manifest)
    assert decoded.totals["samples"] == 1
    assert decoded.totals["failures"] == {"corrupt_image": 2, "missing_image": 1}


def test_array_tasks_then_finalize_from_the_cli(selection, resharded, tmp_path, caplog):
    base = ["reshard", "--selection", str(selection), "--out", str(tmp_path), "--shard-size", "25", "--seed", "3"]
    assert main(base + ["--task-index", "0", "--num-tasks", "2"]) == 0
    assert not (tmp_path / "manifest.json").exists()
    assert main(base + ["--finalize"]) == 2 and "cannot finalize" in caplog.text
    assert main(base + ["--task-index", "1", "--num-tasks", "2", "--no-finalize"]) == 0
    assert not (tmp_path / "manifest.json").exists()
    assert main(base + ["--finalize"]) == 0
    assert mf.load(tmp_path).id == mf.load(resharded).id

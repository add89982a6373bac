"""Select: exact per-class top-K (vs brute force, with ties), map/reduce over tasks, policies, refusals, CLI."""

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError, ManifestError
from pipeline.hashing import sha256_file
from stages.artifacts.logits_reader import open_logits
from stages.artifacts.selection import check_selection_part
from stages.select.stage import select
from stages.select.topk import ClassTopK
from tests.factories import make_exclusion, make_logits, random_shards

T = 2.0


def brute_force(manifest, per_class, top_p, min_score=0.0, drop=()):
    """Every candidate scored in Python, fully sorted by (label, score desc, key asc), cut at K per class."""
    logits = open_logits(manifest)
    rows = []
    for part in range(logits.num_parts):
        for r in logits.read_part(part).to_pylist():
            if r["key"] in drop:
                continue
            for j in range(top_p):
                score = float(np.float32(np.exp(np.float64(r["topk_logit"][j]) / T - np.float64(r["lse"]))))
                if score >= np.float32(min_score):
                    rows.append((r["topk_index"][j], -score, r["key"], r["shard"]))
    rows.sort()
    quota = per_class if isinstance(per_class, list) else [per_class] * logits.num_classes
    out, ranks = [], {}
    for label, neg, key, shard in rows:
        rank = ranks.get(label, 0)
        if rank < quota[label]:
            out.append({"key": key, "shard": shard, "label": label, "score": -neg, "rank": rank, "dup": 0})
            ranks[label] = rank + 1
    return out


def selected(out):
    table = pq.read_table(out / "part-000000.parquet")
    return [{k: (round(v, 7) if isinstance(v, float) else v) for k, v in r.items()}
            for r in table.select(["key", "shard", "label", "score", "rank", "dup"]).to_pylist()]


def rounded(rows):
    return [{**r, "score": round(float(np.float32(r["score"])), 7)} for r in rows]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """5 shards x 120 images, 6 classes, integer logits: many exactly equal scores."""
    out = tmp_path_factory.mktemp("tied")
    return make_logits(out / "logits", random_shards(np.random.default_rng(3), 5, 120, 6, ties=True),
                       topk=4, temperature=T)


def test_accumulator_equals_full_sort_under_heavy_ties_and_tiny_buffer():
    rng = np.random.default_rng(0)
    n, classes = 5000, 7
    labels = rng.integers(0, classes, n).astype(np.int32)
    scores = (rng.integers(0, 6, n) / 8).astype(np.float32)
    keys = [f"k{rng.integers(0, 10**6):07d}-{i}" for i in range(n)]
    quotas = rng.integers(0, 60, classes)
    acc = ClassTopK(quotas, cap=50)
    for start in range(0, n, 37):
        sl = slice(start, start + 37)
        acc.add(labels[sl], scores[sl], pa.table({"key": keys[sl]}))
    assert acc.compactions > 20
    got = acc.result().to_pylist()
    full = sorted(zip(labels.tolist(), (-scores).tolist(), keys))
    want, seen = [], {}
    for label, neg, key in full:
        if seen.get(label, 0) < quotas[label]:
            want.append({"key": key, "label": label, "score": float(-neg)})
            seen[label] = seen.get(label, 0) + 1
    assert got == want


@pytest.mark.parametrize("cap", [None, 40])
def test_topk_equals_brute_force_with_ties(tied, tmp_path, monkeypatch, cap):
    if cap:  # a tiny buffer: the stream is compacted and thresholds rise many times
        monkeypatch.setattr("stages.select.stage.ClassTopK", functools.partial(ClassTopK, cap=cap))
    select(tied, tmp_path / "sel", per_class=37, top_p=3, batch_rows=50, gallery=0)
    assert selected(tmp_path / "sel") == rounded(brute_force(tied, 37, 3))


def test_three_map_tasks_give_byte_identical_output_to_one(tied, tmp_path):
    one = select(tied, tmp_path / "one", per_class=20, top_p=2, soft_targets=True, gallery=0)
    for task in (2, 0):
        assert select(tied, tmp_path / "three", per_class=20, top_p=2, soft_targets=True, task_index=task,
                      num_tasks=3, gallery=0) is None
    three = select(tied, tmp_path / "three", per_class=20, top_p=2, soft_targets=True, task_index=1,
                   num_tasks=3, gallery=0)
    assert (tmp_path / "one/part-000000.parquet").read_bytes() == \
        (tmp_path / "three/part-000000.parquet").read_bytes()
    assert mf.load(one).id == mf.load(three).id
    assert sorted(p.name for p in (tmp_path / "three/_map/tasks-3").glob("part-*.parquet")) == \
        ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]


def test_soft_targets_are_the_logits_row_of_the_key(tied, tmp_path):
    select(tied, tmp_path / "s", per_class=5, top_p=2, soft_targets=True, gallery=0)
    table = pq.read_table(tmp_path / "s/part-000000.parquet")
    assert table.schema.field("topk_index").type == pa.list_(pa.int16(), 4)
    logits = open_logits(tied)
    source = {r["key"]: r for p in range(logits.num_parts) for r in logits.read_part(p).to_pylist()}
    for row in table.to_pylist():
        src = source[row["key"]]
        assert (row["topk_index"], row["topk_logit"], row["lse"]) == \
               (src["topk_index"], src["topk_logit"], src["lse"])


def test_an_image_may_be_selected_for_several_classes(tmp_path):
    logits = np.array([[5.0, 4.9, -9.0], [0.0, 0.0, 0.0], [-9.0, 4.0, 5.0]], np.float32)
    manifest = make_logits(tmp_path / "l", [(["a", "b", "c"], logits)], topk=3, temperature=1.0)
    select(manifest, tmp_path / "s", per_class=1, top_p=2, gallery=0)
    rows = pq.read_table(tmp_path / "s/part-000000.parquet").select(["key", "label"]).to_pylist()
    assert rows == [{"key": "a", "label": 0}, {"key": "a", "label": 1}, {"key": "c", "label": 2}]
    report = json.loads((tmp_path / "s/report/selection_report.json").read_text())
    assert report["multi_label_images"] == 1 and report["unique_images"] == 2


def test_threshold_policy_cap_and_balance_counts(tied, tmp_path):
    select(tied, tmp_path / "t", policy="threshold", per_class=150, min_score=0.3, balance=True, gallery=0)
    table = pq.read_table(tmp_path / "t/part-000000.parquet")
    labels, dup = table.column("label").to_numpy(), table.column("dup").to_numpy()
    argmax = brute_force(tied, 10**6, 1, min_score=0.3)
    available = np.bincount([r["label"] for r in argmax], minlength=6)
    originals = np.bincount(labels[dup == 0], minlength=6)
    assert originals.tolist() == np.minimum(available, 150).tolist()
    assert np.bincount(labels, minlength=6).tolist() == [150 if a else 0 for a in available]
    assert set(table.column("key").to_pylist()) <= {r["key"] for r in argmax}
    for label in np.flatnonzero(available):
        n = min(available[label], 150)
        want = [(r, d) for r in range(n) for d in range(150 // n + (r < 150 % n))]
        got = [(r["rank"], r["dup"]) for r in table.to_pylist() if r["label"] == label]
        assert got == want
    assert (dup > 0).any()
    assert check_selection_part(mf.load(tmp_path / "t"), {}, tmp_path / "t/part-000000.parquet") == []


def test_per_class_file_csv_and_json(tied, tmp_path):
    (tmp_path / "k.csv").write_text("class,k\n0,3\n2,7\n5,1\n")
    (tmp_path / "k.json").write_text(json.dumps({"0": 3, "2": 7, "5": 1}))
    want = rounded(brute_force(tied, [3, 0, 7, 0, 0, 1], 2))
    for name in ("k.csv", "k.json"):
        select(tied, tmp_path / name.replace(".", "_"), per_class=str(tmp_path / name), top_p=2, gallery=0)
        assert selected(tmp_path / name.replace(".", "_")) == want
    (tmp_path / "bad.csv").write_text("class,k\nnine,3\n")
    with pytest.raises(InputError, match="class 'nine'"):
        select(tied, tmp_path / "bad", per_class=str(tmp_path / "bad.csv"), top_p=2)


def test_exclude_drops_keys_before_ranking(tied, tmp_path):
    first = brute_force(tied, 4, 2)
    drop = {r["key"] for r in first[:6]}
    exclusion = make_exclusion(tmp_path / "ex", sorted(drop))
    manifest = select(tied, tmp_path / "s", per_class=4, top_p=2, exclude=exclusion, gallery=0)
    assert selected(tmp_path / "s") == rounded(brute_force(tied, 4, 2, drop=drop))
    assert mf.load(manifest).inputs[1]["role"] == "exclude"


def test_short_class_keeps_what_it_has_and_the_report_says_so(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 3)).astype(np.float32)
    logits[:, 2] -= 50  # class 2 is never in anyone's top-1
    manifest = make_logits(tmp_path / "l", [([f"i{i:02d}" for i in range(40)], logits)], topk=3)
    select(manifest, tmp_path / "s", per_class=25, top_p=1, gallery=0)
    report = json.loads((tmp_path / "s/report/selection_report.json").read_text())
    rows = {r["label"]: r for r in report["per_class"]}
    assert rows[2]["selected"] == 0 and rows[2]["short"] and rows[2]["candidates"] == 0
    assert rows[0]["selected"] == min(25, rows[0]["candidates"])
    assert "2" in report["classes_short"]
    csv_text = (tmp_path / "s/report/per_class.csv").read_text().splitlines()
    assert csv_text[0].startswith("label,class,quota,candidates,selected") and len(csv_text) == 4
    for png in ("counts.png", "scores.png"):
        assert (tmp_path / "s/report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mf.load(tmp_path / "s/report", kind="report").inputs[0]["role"] == "selection"


def _splice(tmp_path):
    """A logits artifact whose part 1 was made at another temperature (manifest rebuilt around it)."""
    shards = random_shards(np.random.default_rng(5), 3, 20, 4)
    a = make_logits(tmp_path / "a", shards, topk=3, temperature=1.0)
    make_logits(tmp_path / "b", shards, topk=3, temperature=3.0)
    shutil.copy(tmp_path / "b/part-000001.parquet", tmp_path / "a/part-000001.parquet")
    data = json.loads(a.read_text())
    entry = data["files"][1]
    entry["bytes"] = (tmp_path / "a/part-000001.parquet").stat().st_size
    entry["sha256"] = sha256_file(tmp_path / "a/part-000001.parquet")
    data["id"] = mf.content_id(data)
    a.write_text(json.dumps(data))
    return a


def test_mixed_logits_parts_are_refused_before_work_naming_the_part(tmp_path):
    mixed = _splice(tmp_path)
    with pytest.raises(ManifestError, match=r"part-000001\.parquet \(temperature=3\.0 not 1\.0\)") as err:
        select(mixed, tmp_path / "s", per_class=3, top_p=1)
    assert "part-000000" not in str(err.value) and not (tmp_path / "s").exists()


def test_options_are_checked_against_the_logits(tied, tmp_path):
    with pytest.raises(InputError, match="--top-p 5"):
        select(tied, tmp_path / "s", per_class=3, top_p=5)
    with pytest.raises(InputError, match="--balance"):
        select(tied, tmp_path / "s", per_class=3, top_p=2, balance=True)


def test_cli_round_trip_and_verify(tied, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["select", "--logits", str(tied), "--out", str(out), "--per-class", "9", "--top-p", "2",
            "--gallery", "0"]
    assert main(args) == 0
    assert selected(out) == rounded(brute_force(tied, 9, 2))
    assert main(["verify", str(out / "manifest.json")]) == 0
    before = (out / "part-000000.parquet").read_bytes()
    assert main(args) == 0 and (out / "part-000000.parquet").read_bytes() == before
    params = mf.load(out).params
    assert (params["policy"], params["top_p"], params["per_class"][0], params["temperature"]) == ("topk", 2, 9, T)


def test_verify_check_flags_a_part_in_the_wrong_order(tied, tmp_path):
    manifest = select(tied, tmp_path / "s", per_class=5, top_p=2, gallery=0)
    table = pq.read_table(tmp_path / "s/part-000000.parquet")
    pq.write_table(table.take(pa.array(np.arange(table.num_rows)[::-1])), tmp_path / "rev.parquet")
    problems = check_selection_part(mf.load(manifest), {}, tmp_path / "rev.parquet")
    assert any("not sorted by (label, rank, dup)" in p for p in problems)


def test_gallery_through_the_lineage(tmp_path):
    assert main(["ingest", "digits", "--out", str(tmp_path / "d"), "--shard-size", "400"]) == 0
    dataset = mf.load(tmp_path / "d", kind="dataset")
    keys = [f"digits-{i:05d}" for i in range(800)]
    logits = np.random.default_rng(2).normal(size=(800, 10)).astype(np.float32)
    shards = [(keys[:400], logits[:400]), (keys[400:], logits[400:])]
    manifest = make_logits(tmp_path / "l", shards, topk=3, data=dataset.path)
    select(manifest, tmp_path / "s", per_class=5, top_p=1, gallery=3)
    gallery = sorted(p.name for p in (tmp_path / "s/report/gallery").iterdir())
    assert gallery == [f"class-{c:05d}.png" for c in range(10)]
    report = mf.load(tmp_path / "s/report", kind="report")
    assert "gallery/class-00003.png" in [f["path"] for f in report.files]


def test_nothing_selected_gives_a_valid_empty_artifact(tied, tmp_path):
    manifest = select(tied, tmp_path / "s", per_class=0, top_p=2, soft_targets=True, gallery=0)
    table = pq.read_table(tmp_path / "s/part-000000.parquet")
    assert table.num_rows == 0 and table.schema.field("topk_index").type == pa.list_(pa.int16(), 4)
    assert mf.load(manifest).totals["rows"] == 0 and main(["verify", str(manifest)]) == 0


def test_multi_view_logits_are_ranked_by_the_centre_view(tied, tmp_path):
    """Each key gets a second row (view 1, another image's predictions): the selection must not change."""
    shutil.copytree(Path(tied).parent, tmp_path / "mv")
    data = json.loads((tmp_path / "mv/manifest.json").read_text())
    for entry in data["files"]:
        path = tmp_path / "mv" / entry["path"]
        table = pq.read_table(path)
        other = table.take(pa.array(np.arange(table.num_rows)[::-1]))
        both = pa.concat_tables([table, other.set_column(0, table.schema.field("key"), table.column("key"))])
        order = np.argsort(np.r_[np.arange(table.num_rows) * 2, np.arange(table.num_rows) * 2 + 1])
        both = both.append_column("view", pa.array(np.r_[np.zeros(table.num_rows), np.ones(table.num_rows)],
                                                   pa.int16())).take(pa.array(order))
        pq.write_table(both, path)
        entry.update(rows=both.num_rows, bytes=path.stat().st_size, sha256=sha256_file(path))
    data["id"] = mf.content_id(data)
    (tmp_path / "mv/manifest.json").write_text(json.dumps(data))
    select(tmp_path / "mv", tmp_path / "s", per_class=11, top_p=2, gallery=0)
    assert selected(tmp_path / "s") == rounded(brute_force(tied, 11, 2))

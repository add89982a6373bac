"""Consistent teaching: seeded views, exact rebuilds, the multi-view row layout, epoch sampling, check_views."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError, ManifestError
from stages.artifacts.cards import write_card
from stages.artifacts.logits_format import arrow_schema
from stages.artifacts.logits_reader import open_logits
from stages.artifacts.views import (
    iter_key_groups,
    key_probs,
    multiview_schema,
    spec_of,
    view_arrays,
    views_from_table,
    with_views,
)
from stages.imaging import Preprocess, centre_box, decode, find_image
from stages.ingest.stage import ingest
from stages.logits.check_views import check_views
from stages.models.classifiers import build_model
from stages.shardio import ShardStats, read_shard
from stages.views.render import View, epoch_view, mix_uint8, render_shard_views, render_view, sample_views
from stages.views.spec import AugSpec, AugSpecError, parse_aug
from tests.factories import make_multiview_logits

PP = Preprocess(size=28, crop_fraction=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SPEC = parse_aug("rrc:0.35-1,flip:0.5,mixup:0.2", views=4, seed=7)
REPO = Path(__file__).resolve().parents[1]


def _card(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("smallcnn", 10).eval()
    return write_card(out, model, arch="smallcnn", class_names=[str(d) for d in range(10)], preprocess=PP,
                      stage="test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """60 digits in 3 shards, a seeded smallcnn teacher card, and its honest 4-view logits."""
    root = tmp_path_factory.mktemp("views")
    data = ingest("digits", root / "ds", shard_size=25, split="small=6/class,rest=rest")["small"]
    card = _card(root / "teacher", 0)
    logits = make_multiview_logits(root / "logits", data, card, SPEC, topk=5, temperature=2.0)
    return {"root": root, "data": data, "card": card, "logits": logits}


def test_spec_round_trips_through_json_and_its_string():
    stored = json.loads(json.dumps(SPEC.to_dict()))
    assert AugSpec.from_dict(stored) == SPEC
    assert parse_aug(SPEC.to_string(), views=4, seed=7) == SPEC
    assert SPEC.to_dict() == {"version": 1, "views": 4, "rrc": {"scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]},
                              "flip": 0.5, "mixup_alpha": 0.2, "seed": 7, "view0": "centre"}
    assert parse_aug("none") == AugSpec() and parse_aug("flip:1", views=2).scale is None


@pytest.mark.parametrize("text, views, message", [
    ("rrc:0-1", 4, "0 < low <= high <= 1"),
    ("rrc:0.9-0.2", 4, "0 < low <= high <= 1"),
    ("rrc:0.5", 4, "needs a range LO-HI"),
    ("flip:1.5", 4, "not in [0, 1]"),
    ("flip:x", 4, "flip value 'x' is not a number"),
    ("mixup:-1", 4, "must be >= 0"),
    ("blur:3", 4, "bad token 'blur:3'"),
    ("flip:0.5,flip:0.2", 4, "'flip' given twice"),
    ("ratio:0.5-2", 4, "ratio needs rrc"),
    ("none", 4, "4 views need an augmentation"),
    ("flip:0.5", 0, "views must be an integer"),
])
def test_bad_specs_raise_a_named_error(text, views, message):
    with pytest.raises(AugSpecError) as err:
        parse_aug(text, views=views)
    assert message in str(err.value)


def test_stored_spec_of_another_version_or_shape_is_refused():
    data = SPEC.to_dict()
    with pytest.raises(AugSpecError, match="version 2: this kdpipe draws version 1"):
        AugSpec.from_dict({**data, "version": 2})
    with pytest.raises(AugSpecError, match="fields"):
        AugSpec.from_dict({**data, "blur": 1})
    assert issubclass(AugSpecError, InputError)


def _all_views(keys: list[str], shard_keys: list[str]) -> dict:
    return {k: sample_views(SPEC, k, 40 + i, 30 + 2 * i, shard_keys, pp=PP) for i, k in enumerate(keys)}


def test_views_do_not_depend_on_iteration_order():
    keys = [f"img-{i:03d}" for i in range(20)]
    forward = _all_views(keys, keys)
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    backward = {k: sample_views(SPEC, k, 40 + keys.index(k), 30 + 2 * keys.index(k), shuffled, pp=PP)
                for k in reversed(keys)}
    assert forward == backward
    other_seed = sample_views(parse_aug(SPEC.to_string(), views=4, seed=8), keys[0], 40, 30, keys, pp=PP)
    assert other_seed[1:] != forward[keys[0]][1:]


def test_views_are_identical_in_another_process():
    code = ("import json; from tests.test_views import _all_views; keys=[f'img-{i:03d}' for i in range(20)]; "
            "print(json.dumps({k: [v.to_json() for v in vs] for k, vs in _all_views(keys, keys).items()}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, check=True)
    keys = [f"img-{i:03d}" for i in range(20)]
    here = {k: [v.to_json() for v in vs] for k, vs in _all_views(keys, keys).items()}
    assert json.loads(out.stdout) == here


def test_view0_is_the_centre_view_and_parameters_are_float32_exact():
    keys = [f"k{i}" for i in range(30)]
    by_key = _all_views(keys, keys)
    views = [v for vs in by_key.values() for v in vs]
    assert sample_views(SPEC, "k0", 40, 30, keys, pp=PP)[0] == View(0, centre_box(40, 30, PP))
    for i, (key, vs) in enumerate(by_key.items()):
        for v in vs:
            assert all(float(np.float32(x)) == x for x in (*v.box, v.lam))
            assert 0 <= v.box[0] < v.box[2] <= 40 + i and 0 <= v.box[1] < v.box[3] <= 30 + 2 * i
            assert (v.partner is None) == (v.index == 0) and v.partner != key and 0.5 <= v.lam <= 1.0
    assert {v.flip for v in views} == {True, False} and len({v.box for v in views}) > 100
    assert View.from_json(json.loads(json.dumps(views[5].to_json()))) == views[5]


def test_mixup_rounds_once_in_uint8_and_needs_the_partner_image():
    own, other = np.array([[[0, 10, 255]]], np.uint8), np.array([[[255, 11, 0]]], np.uint8)
    assert mix_uint8(own, other, 0.5).tolist() == [[[128, 10, 128]]]  # rint: half to even
    view = View(1, (0.0, 0.0, 8.0, 8.0), partner="other", lam=0.75)
    with pytest.raises(InputError, match="pass its image as partner_img"):
        render_view(decode(_png_bytes()), view, PP)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rebuilt_views_are_bit_identical_to_the_views_the_logits_were_made_from(world):
    dataset, logits = mf.load(world["data"]), open_logits(world["logits"])
    for part in range(logits.num_parts):
        entry = dataset.files[part]
        samples = {k: find_image(f) for k, f in read_shard(dataset.file_path(entry), ShardStats("s"))}
        made = list(render_shard_views(samples.items(), SPEC, PP, lambda reason, key: None))
        table = logits.read_part(part)
        stored = views_from_table(table)
        assert [r.key for r in made] == table.column("key").to_pylist()
        assert stored == [r.view for r in made] and [v.index for v in stored[:8]] == [0, 1, 2, 3] * 2
        for row, view in zip(made, stored):
            partner = None if view.partner is None else decode(samples[view.partner])
            rebuilt = render_view(decode(samples[row.key]), view, PP, partner)
            assert rebuilt.dtype == np.uint8 and np.array_equal(rebuilt, row.pixels), (row.key, view)
    assert logits.params["views"] == {"count": 4, "policy": "centre+aug", "aug": SPEC.to_dict()}
    assert any(v.partner for v in stored) and any(v.flip for v in stored)


def test_epoch_view_uses_every_view_once_per_block_of_v_epochs():
    for v in (1, 4, 8):
        for key in ("a", "b", "img-00042"):
            picks = [epoch_view(5, key, epoch, v) for epoch in range(3 * v)]
            for block in range(3):
                assert sorted(picks[block * v:(block + 1) * v]) == list(range(v))
            assert picks == [epoch_view(5, key, epoch, v) for epoch in range(3 * v)]
    orders = {tuple(epoch_view(5, f"k{i}", e, 8) for e in range(8)) for i in range(20)}
    assert len(orders) > 10  # per-key orders, not one global schedule
    assert [epoch_view(5, "a", e, 8) for e in range(8)] != [epoch_view(5, "a", e, 8) for e in range(8, 16)]
    with pytest.raises(ValueError):
        epoch_view(0, "a", 0, 0)


def test_multiview_schema_extends_the_logits_schema_and_round_trips_views(tmp_path):
    base = arrow_schema(10, 3, metadata={"topk": 3})
    schema = multiview_schema(base, SPEC)
    assert schema.names == base.names + ["view", "view_box", "view_flip", "view_partner", "view_lambda"]
    assert str(schema.field("view_box").type) == "fixed_size_list<item: float>[4]"
    assert schema.field("view").type == pa.int16() and schema.field("view_partner").nullable
    assert schema.metadata[b"kdpipe"] == base.metadata[b"kdpipe"] and spec_of(schema) == SPEC
    views = [v for vs in _all_views(["a", "b"], ["a", "b", "c"]).values() for v in vs]
    n = len(views)
    table = pa.Table.from_pydict({
        "key": ["a"] * 4 + ["b"] * 4, "shard": pa.array([0] * n, pa.int32()),
        "topk_index": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * n), pa.int16()), 3),
        "topk_logit": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * n), pa.float32()), 3),
        "lse": pa.array(np.zeros(n), pa.float32())}, schema=base)
    pq.write_table(with_views(table, views, SPEC), tmp_path / "p.parquet", compression="zstd")
    back = pq.read_table(tmp_path / "p.parquet")
    assert views_from_table(back) == views and spec_of(back.schema) == SPEC


def _toy_rows() -> pa.Table:
    keys, views, idx, z = [], [], [], []
    for k, key in enumerate(["x", "y", "z"]):
        for v in range(3):
            keys.append(key)
            views.append(View(v, (0.0, 0.0, 1.0, 1.0)))
            idx.append([k, (k + 1) % 4])
            z.append([4.0 - v, 1.0])
    base = arrow_schema(4, 2)
    lse = [np.log(np.exp(r[0]) + np.exp(r[1]) + 2.0) for r in z]  # the two other classes have logit 0
    table = pa.Table.from_pydict({
        "key": keys, "shard": pa.array([0] * 9, pa.int32()),
        "topk_index": pa.FixedSizeListArray.from_arrays(pa.array(np.ravel(idx), pa.int16()), 2),
        "topk_logit": pa.FixedSizeListArray.from_arrays(pa.array(np.ravel(z), pa.float32()), 2),
        "lse": pa.array(lse, pa.float32())}, schema=base)
    return with_views(table, views, SPEC)


def test_selection_score_is_view0_or_the_mean_over_views_per_key():
    table = _toy_rows()
    keys, shards, centre = key_probs(table, 1.0, 4, "centre")
    assert keys == ["x", "y", "z"] and shards.tolist() == [0, 0, 0]
    expected0 = np.exp(4.0) / (np.exp(4.0) + np.exp(1.0) + 2.0)
    assert np.allclose(centre[:, [0, 1, 2]].diagonal(), expected0, atol=1e-6)
    _, _, mean = key_probs(table, 1.0, 4, "mean")
    per_view = [np.exp(4.0 - v) / (np.exp(4.0 - v) + np.exp(1.0) + 2.0) for v in range(3)]
    assert np.allclose(mean[0, 0], np.mean(per_view), atol=1e-6) and np.allclose(mean.sum(axis=1), 1, atol=1e-6)
    regrouped = list(iter_key_groups(table.to_batches(max_chunksize=2)))  # 2-row batches split every key
    assert [b.column("key").to_pylist() for b in regrouped] == [["x"] * 3, ["y"] * 3, ["z"] * 3]
    merged = np.concatenate([key_probs(b, 1.0, 4, "mean")[2] for b in regrouped])
    assert np.array_equal(merged, mean)


def test_check_views_agrees_on_every_row_of_an_honest_artifact(world, capsys):
    report = check_views(world["logits"], 10_000, batch_size=7)
    assert report.checked == 60 * 4 and report.agreed == report.checked and report.mismatches == []
    assert main(["check_views", "--logits", str(world["logits"]), "--sample", "50"]) == 0
    assert "checked 50 rows: 50 agree (100.00%)" in capsys.readouterr().out


def _tamper_logit(part: int, table: pa.Table) -> pa.Table:
    if part != 1:
        return table
    z = table.column("topk_logit").combine_chunks()
    flat = z.flatten().to_numpy().copy()
    flat[5 * 6] += 0.01  # row 6 (key 1, view 2): its largest logit
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 5)
    return table.set_column(table.schema.get_field_index("topk_logit"), table.schema.field("topk_logit"), column)


def test_check_views_flags_a_tampered_logit_naming_its_key_and_view(world, tmp_path, capsys):
    bad = make_multiview_logits(tmp_path / "bad", world["data"], world["card"], SPEC, topk=5, temperature=2.0,
                                edit=_tamper_logit)
    key = open_logits(bad).read_part(1).column("key")[6].as_py()
    report = check_views(bad, 10_000)
    assert report.checked == 240 and report.agreed == 239
    assert [(m["key"], m["view"], m["reason"]) for m in report.mismatches] == [(key, 2, "logit_differs")]
    assert 0.009 < report.mismatches[0]["max_abs_diff"] < 0.011
    assert main(["check_views", "--logits", str(bad), "--sample", "10000"]) == 1
    assert f"{key}\tview 2\tlogit_differs" in capsys.readouterr().out


def _tamper_box(part: int, table: pa.Table) -> pa.Table:
    if part != 0:
        return table
    views = views_from_table(table)
    v = views[3]
    views[3] = View(v.index, (v.box[0], v.box[1], v.box[2] - 1.0, v.box[3]), v.flip, v.partner, v.lam)
    arrays = view_arrays(views)
    index = table.schema.get_field_index("view_box")
    return table.set_column(index, table.schema.field("view_box"), arrays["view_box"])


def test_check_views_flags_a_view_the_spec_did_not_draw(world, tmp_path):
    bad = make_multiview_logits(tmp_path / "bad", world["data"], world["card"], SPEC, topk=5, temperature=2.0,
                                edit=_tamper_box)
    key = open_logits(bad).read_part(0).column("key")[3].as_py()
    report = check_views(bad, 10_000)
    assert report.checked == 240 and report.agreed == 239
    found = [(m["key"], m["view"], m["reason"]) for m in report.mismatches]
    assert found[0] == (key, 3, "view_not_from_spec")  # the stored box is not the one the spec draws
    assert found[1:] == [(key, 3, "logit_differs")]  # and the teacher's logits on it are not the stored ones


def test_check_views_refuses_a_teacher_that_did_not_make_the_logits(world, tmp_path):
    other = _card(tmp_path / "other", 1)
    with pytest.raises(ManifestError, match="is not the teacher of"):
        check_views(world["logits"], 5, teacher=other)

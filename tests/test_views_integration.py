"""Consistent teaching through the real stages: logits --views/--aug -> verify/check_views -> select ->
reshard -> the trainer's stored-view samples, on the bundled digits (docs/views.md)."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import FingerprintMismatch, InputError
from stages.artifacts.cards import load_classifier, write_card
from stages.artifacts.logits_format import fixed_list_to_numpy
from stages.artifacts.logits_reader import open_logits
from stages.artifacts.views import VIEW_COLUMNS, views_from_table
from stages.imaging import Preprocess, decode, find_image, normalise
from stages.ingest.stage import ingest
from stages.logits.stage import compute_logits
from stages.models.classifiers import build_model
from stages.reshard.stage import iter_training_samples, reshard
from stages.select.stage import select
from stages.shardio import ShardStats, read_shard
from stages.train.config import TrainConfig
from stages.train.data import decode_sample
from stages.train.inputs import load_inputs, make_plan
from stages.views.render import View, epoch_view, render_view
from stages.views.spec import parse_aug
from tests.factories import make_multiview_logits

PP = Preprocess(size=28, crop_fraction=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SPEC = parse_aug("rrc:0.5-1,flip:0.5,mixup:0.2", views=4, seed=3)
T, K = 2.0, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """60 labeled digits in 3 shards, a seeded smallcnn teacher card, and the real stage's 4-view logits."""
    root = tmp_path_factory.mktemp("views_int")
    data = ingest("digits", root / "ds", shard_size=25, split="small=6/class,rest=rest")["small"]
    torch.manual_seed(0)
    card = write_card(root / "teacher", build_model("smallcnn", 10).eval(), arch="smallcnn",
                      class_names=[str(d) for d in range(10)], preprocess=PP, stage="test")
    logits = compute_logits(data, card, root / "logits", topk=K, temperature=T, logit_dtype="float32",
                            num_workers=0, loader_batch=7, batch_size=16, aug=SPEC)
    return {"root": root, "data": data, "card": card, "logits": logits}


def test_real_stage_rows_are_key_view_pairs_equal_to_an_independent_forward(world):
    """The stage's rows equal the factory's (render_shard_views + one plain forward): keys, views, top-K."""
    ref = open_logits(make_multiview_logits(world["root"] / "ref", world["data"], world["card"], SPEC, topk=K,
                                            temperature=T))
    logits = open_logits(world["logits"])
    manifest = mf.load(world["logits"], kind="logits")
    assert manifest.params["views"] == {"count": 4, "policy": "centre+aug", "aug": SPEC.to_dict()}
    assert manifest.totals["samples"] == 60 and manifest.totals["rows"] == 240
    for i in range(logits.num_parts):
        got, want = logits.read_part(i), ref.read_part(i)
        assert got.column("key").to_pylist() == want.column("key").to_pylist()
        assert got.column("view").to_pylist() == [0, 1, 2, 3] * (got.num_rows // 4)
        assert views_from_table(got) == views_from_table(want)
        index = [fixed_list_to_numpy(t.column("topk_index"), K) for t in (got, want)]
        assert (index[0] == index[1]).all()
        np.testing.assert_allclose(fixed_list_to_numpy(got.column("topk_logit"), K),
                                   fixed_list_to_numpy(want.column("topk_logit"), K), rtol=1e-5, atol=1e-5)
        meta = json.loads(pq.ParquetFile(logits.part_path(i)).schema_arrow.metadata[b"kdpipe.views"])
        assert meta == SPEC.to_dict()


def test_parts_are_byte_identical_across_workers_loader_batches_and_tasks(world, tmp_path):
    for task in range(2):
        compute_logits(world["data"], world["card"], tmp_path / "b", topk=K, temperature=T, logit_dtype="float32",
                       num_workers=2, loader_batch=3, batch_size=16, aug=SPEC, task_index=task, num_tasks=2)
    for i in range(3):
        name = f"part-{i:06d}.parquet"
        assert (tmp_path / "b" / name).read_bytes() == (world["logits"].parent / name).read_bytes()


def test_another_spec_or_seed_is_another_fingerprint(world):
    other = parse_aug("rrc:0.5-1,flip:0.5,mixup:0.2", views=4, seed=4)
    with pytest.raises(FingerprintMismatch):
        compute_logits(world["data"], world["card"], world["logits"].parent, topk=K, temperature=T,
                       logit_dtype="float32", num_workers=0, batch_size=16, aug=other)


def test_verify_and_check_views_agree_on_every_row_of_the_real_artifact(world, capsys):
    assert main(["verify", str(world["logits"])]) == 0
    assert main(["check_views", "--logits", str(world["logits"]), "--sample", "240"]) == 0
    assert "checked 240 rows: 240 agree (100.00%)" in capsys.readouterr().out


def test_cli_flags_build_the_spec_and_refuse_views_without_aug(world, tmp_path):
    args = ["logits", "--data", str(world["data"]), "--teacher", str(world["card"]), "--topk", str(K),
            "--temperature", str(T), "--num-workers", "0", "--logit-dtype", "float32", "--batch-size", "16"]
    assert main(args + ["--views", "4", "--aug", SPEC.to_string(), "--aug-seed", "3", "--out",
                        str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "part-000001.parquet").read_bytes() == \
        (world["logits"].parent / "part-000001.parquet").read_bytes()
    assert main(args + ["--views", "4", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "part-000000.parquet").exists()


def test_single_view_logits_keep_the_plain_layout(world, tmp_path):
    path = compute_logits(world["data"], world["card"], tmp_path / "one", topk=K, temperature=T, num_workers=0)
    table = open_logits(path).read_part(0)
    assert not set(VIEW_COLUMNS) & set(table.schema.names)
    assert mf.load(path).params["views"] == {"count": 1, "policy": "centre", "aug": None}


def _images(data: Path) -> dict[str, bytes]:
    manifest = mf.load(data)
    return {k: find_image(f) for e in manifest.files
            for k, f in read_shard(manifest.file_path(e), ShardStats("x"), e["sha256"])}


@pytest.fixture(scope="module")
def shards(world):
    sel = select(world["logits"], world["root"] / "sel", per_class=3, top_p=2, soft_targets=True)
    return reshard(sel, world["root"] / "rs", shard_size=20).manifest


def test_reshard_carries_every_view_and_the_partners_original_bytes(world, shards):
    logits, images = open_logits(world["logits"]), _images(world["data"])
    rows = {}
    for i in range(logits.num_parts):
        table = logits.read_part(i)
        for j, (key, view) in enumerate(zip(table.column("key").to_pylist(), views_from_table(table))):
            rows[(key, view.index)] = (view, table.slice(j, 1).to_pylist()[0])
    seen_partner = 0
    for key, fields in iter_training_samples(shards):
        body = json.loads(fields["json"])
        assert [r["view"] for r in body["views"]] == [0, 1, 2, 3]
        for record in body["views"]:
            view, row = rows[(body["source_key"], record["view"])]
            assert (record["box"], record["flip"], record["partner"]) == (list(view.box), view.flip, view.partner)
            assert record["topk_index"] == row["topk_index"] and record["lse"] == row["lse"]
            if view.partner is not None:
                seen_partner += 1
                assert fields[f"p{view.index}.png"] == images[view.partner]
        assert body["topk_logit"] == body["views"][0]["topk_logit"]
    assert seen_partner > 0
    assert mf.load(shards).params["soft_targets"]["views"]["count"] == 4


def test_trainer_replays_each_stored_view_once_per_v_epochs_and_the_teacher_gives_its_stored_logits(world, shards):
    """Done-when (1): the pixels the trainer builds, run through the teacher, give the stored top-K and lse."""
    config = TrainConfig(loss="soft", preprocess=PP, batch_size=4)
    inputs = load_inputs([shards], None, config)
    plan = make_plan(inputs, config, world=1)
    assert plan.view_preprocess == PP
    model, _ = load_classifier(world["card"])
    samples = list(iter_training_samples(shards))[:6]
    for key, fields in samples:
        body, used = json.loads(fields["json"]), []
        for epoch in range(4):
            out = decode_sample({"__key__": key, "fields": fields, "joined": None, "pass": 0}, plan, epoch)
            v = epoch_view(plan.seed, key, epoch, 4)
            record = body["views"][v]
            used.append(v)
            assert out["box"] == tuple(record["box"]) and out["flip"] == record["flip"]
            with torch.inference_mode():
                z = model(normalise(torch.from_numpy(np.array(out["pixels"][None])), PP))[0]
            top = torch.sort(z, descending=True, stable=True)
            assert top.indices[:K].tolist() == record["topk_index"] == out["soft"][0].tolist()
            np.testing.assert_allclose(top.values[:K].numpy(), record["topk_logit"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(torch.logsumexp(z / T, 0).item(), record["lse"], rtol=1e-5)
        assert sorted(used) == [0, 1, 2, 3]


def test_trainer_view_pixels_equal_a_fresh_render_and_ignore_student_augmentation(world, shards):
    config = TrainConfig(loss="soft", preprocess=PP, batch_size=4)
    plan = make_plan(load_inputs([shards], None, config), config, world=1)
    assert plan.augment is not None  # the student's own augmentation is on, and unused for stored views
    images = _images(world["data"])
    key, fields = next(iter(iter_training_samples(shards)))
    body = json.loads(fields["json"])
    for epoch in range(4):
        record = body["views"][epoch_view(plan.seed, key, epoch, 4)]
        view = View.from_json(record)
        partner = None if view.partner is None else decode(images[view.partner])
        want = render_view(decode(images[body["source_key"]]), view, PP, partner)
        got = decode_sample({"__key__": key, "fields": fields, "joined": None, "pass": 0}, plan, epoch)["pixels"]
        assert np.array_equal(got, want)


def test_trainer_refuses_another_size_and_joined_multiview_logits(world, shards):
    config = TrainConfig(loss="soft", preprocess=Preprocess(size=16, crop_fraction=1.0), batch_size=4)
    with pytest.raises(InputError, match="--size 28"):
        make_plan(load_inputs([shards], None, config), config, world=1)
    soft = TrainConfig(loss="soft", preprocess=PP, batch_size=4)
    with pytest.raises(InputError, match="reshard them"):
        load_inputs([world["data"]], [world["logits"]], soft)


def test_kdpipe_train_runs_on_multiview_shards(world, shards, tmp_path):
    assert main(["train", "--train", str(shards), "--out", str(tmp_path / "st"), "--loss", "soft", "--epochs", "2",
                 "--batch-size", "4", "--threads", "1", "--size", "28", "--mean", "0.5", "0.5", "0.5",
                 "--std", "0.5", "0.5", "0.5"]) == 0
    assert mf.load(tmp_path / "st").kind == "model"


def test_corrupt_images_get_no_rows_are_counted_once_and_are_never_partners(tmp_path):
    from tests.test_logits_failures import GOOD, PLANTED
    from tests.test_logits_support import NAMES, make_dataset, train_card

    planted = [dict(__key__=k, **v) for k, v in PLANTED.items()]
    data = make_dataset(tmp_path / "data", [GOOD[:4], GOOD[4:6] + planted[:3] + GOOD[6:8] + planted[3:]], NAMES)
    card = train_card(tmp_path / "card", None, steps=0, seed=1)
    spec = parse_aug("rrc:0.5-1,mixup:0.4", views=3, seed=0)
    runs = [compute_logits(data, card, tmp_path / f"out{w}", topk=3, temperature=1.0, num_workers=w,
                           loader_batch=2, batch_size=4, aug=spec) for w in (0, 2)]
    table = open_logits(runs[0]).read_part(1)
    good = ["g004", "g005", "g006", "g007", "ok-png16"]
    assert table.column("key").to_pylist() == [k for k in good for _ in range(3)]
    assert set(table.column("view_partner").to_pylist()) - {None} <= set(good)
    receipt = json.loads((tmp_path / "out0" / "_parts" / "part-000001.json").read_text())
    assert receipt["failures"] == {"corrupt_image": ["bad-garbage", "bad-truncated"], "empty_image": ["bad-zero"],
                                   "missing_image": ["bad-noimage"]}
    assert receipt["rows"] == 15 and mf.load(runs[0]).totals["samples"] == 13
    assert (tmp_path / "out0" / "part-000001.parquet").read_bytes() == \
        (tmp_path / "out2" / "part-000001.parquet").read_bytes()


def test_nonfinite_logits_drop_all_of_an_images_views_and_count_it_once(tmp_path):
    from tests.test_logits_failures import GOOD
    from tests.test_logits_support import DIGITS_PP, NAMES, make_dataset

    data = make_dataset(tmp_path / "data", [GOOD[:4]], NAMES)
    torch.manual_seed(0)
    model = build_model("smallcnn", 10)
    with torch.no_grad():
        model.fc.weight[3, 0] = float("nan")
    card = write_card(tmp_path / "nan", model, arch="smallcnn", class_names=NAMES, preprocess=DIGITS_PP,
                      stage="test")
    path = compute_logits(data, card, tmp_path / "out", topk=3, temperature=1.0, num_workers=0, batch_size=5,
                          aug=parse_aug("flip:0.5", views=3))
    receipt = json.loads((tmp_path / "out" / "_parts" / "part-000000.json").read_text())
    assert receipt["rows"] == 0 and receipt["failures"] == {"nonfinite_logits": ["g000", "g001", "g002", "g003"]}
    assert mf.load(path).totals["failures"]["nonfinite_logits"] == 4


def test_a_partner_pool_draws_the_same_views_as_the_key_list():
    from stages.views.render import PartnerPool, sample_views

    keys = [f"k{i:03d}" for i in range(40, 0, -1)]
    spec = parse_aug("rrc:0.5-1,mixup:0.3", views=5, seed=1)
    pool = PartnerPool(keys)
    for key in keys[:10] + ["not-in-shard"]:
        assert sample_views(spec, key, 30, 20, pool, pp=PP) == sample_views(spec, key, 30, 20, keys, pp=PP)
    assert list(pool.others("k005")) == sorted(set(keys) - {"k005"})

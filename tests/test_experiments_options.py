"""Issue 20's "Also" list: the T = 1 normaliser ``lse1`` (logits schema 2) and ``select --rank-temperature``,
``--threads`` on logits/evaluate, ``smallcnn-W``, AdamW, and ``ingest --split N/class:first``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.cli import build_parser, main
from pipeline.errors import InputError
from pipeline.hashing import sha256_json
from stages.artifacts.cards import load_classifier, write_card
from stages.artifacts.logits_format import LSE1, SCHEMA_VERSION, read_metadata
from stages.artifacts.logits_reader import open_logits
from stages.imaging import normalise
from stages.ingest.stage import assign_splits, parse_split
from stages.logits.stage import compute_logits
from stages.models.classifiers import build_model
from stages.select.policy import exact_scores
from stages.select.stage import select
from stages.train.config import TrainConfig
from stages.train.loop import _optimizer
from tests import factories
from tests.factories import make_logits, random_shards
from tests.test_logits_support import DIGITS_PP, NAMES, digits_data, shard_images, train_card


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The same teacher's logits of 200 digits stored at T = 4 and at T = 1 (logits stage, 1 thread)."""
    root = tmp_path_factory.mktemp("lse1")
    data = digits_data(root / "data", shard_size=100, samples=200)
    card = train_card(root / "teacher", data, steps=20)
    run = lambda t, out, threads: compute_logits(data, card, root / out, topk=5, temperature=t, num_workers=0,
                                                 threads=threads)
    return {"data": data, "card": card, "t4": run(4.0, "t4", 1), "t1": run(1.0, "t1", 1),
            "t4_two_threads": run(4.0, "t4-2", 2), "root": root}


def test_logits_parts_store_lse1_the_logsumexp_of_the_full_logits(stored):
    logits = open_logits(stored["t4"])
    assert logits.params["parquet_schema_version"] == SCHEMA_VERSION == 2
    table = logits.read_part(0)
    assert table.schema.field(LSE1).type == "float" and read_metadata(table.schema)["schema_version"] == 2
    model, _ = load_classifier(stored["card"])
    keys, views = shard_images(stored["data"])[0]
    with torch.inference_mode():
        z = model(normalise(torch.from_numpy(views), DIGITS_PP))
    assert table.column("key").to_pylist() == keys
    np.testing.assert_allclose(table.column(LSE1).to_numpy(), torch.logsumexp(z, 1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(table.column("lse").to_numpy(), torch.logsumexp(z / 4, 1).numpy(), rtol=1e-5)
    assert main(["verify", str(stored["t4"])]) == 0


def test_threads_do_not_change_a_byte_of_the_logits(stored):
    ours, theirs = mf.load(stored["t4"]), mf.load(stored["t4_two_threads"])
    assert [f["sha256"] for f in ours.files] == [f["sha256"] for f in theirs.files]
    args = build_parser().parse_args(["evaluate", "--out", "O", "--threads", "1"])
    assert args.threads == 1
    assert build_parser().parse_args(["logits", "--data", "D", "--teacher", "T", "--topk", "5", "--temperature",
                                      "2", "--out", "O", "--threads", "2"]).threads == 2


def _rows(folder):
    return pq.read_table(folder / "part-000000.parquet").select(["key", "label", "score", "rank"]).to_pylist()


def test_rank_temperature_1_selects_what_logits_stored_at_t1_select(stored, tmp_path):
    at_one = select(stored["t1"], tmp_path / "t1", per_class=5, top_p=2)
    ranked = select(stored["t4"], tmp_path / "t4r1", per_class=5, top_p=2, rank_temperature=1.0, soft_targets=True)
    plain = select(stored["t4"], tmp_path / "t4", per_class=5, top_p=2)
    assert _rows(at_one.parent) == _rows(ranked.parent) != _rows(plain.parent)
    manifest = mf.load(ranked, kind="selection")
    assert manifest.params["rank_temperature"] == 1.0 and manifest.params["temperature"] == 4.0
    assert "rank_temperature" not in mf.load(plain).params  # the flag left out: the same params as before
    soft = pq.read_table(ranked.parent / "part-000000.parquet").column("lse").to_pylist()
    source = {r["key"]: r["lse"] for r in open_logits(stored["t4"]).read_part(0).to_pylist()} | \
             {r["key"]: r["lse"] for r in open_logits(stored["t4"]).read_part(1).to_pylist()}
    keys = pq.read_table(ranked.parent / "part-000000.parquet").column("key").to_pylist()
    assert soft == [source[k] for k in keys]  # the soft targets stay those stored at T = 4


def test_rank_temperature_needs_lse1_and_is_refused_at_other_temperatures(stored, tmp_path):
    old = make_logits(tmp_path / "v1", random_shards(np.random.default_rng(0), 2, 30, 10), temperature=4.0)
    with pytest.raises(InputError, match="no lse1 column.*recompute these logits"):
        select(old, tmp_path / "s1", per_class=3, rank_temperature=1.0)
    with pytest.raises(InputError, match="--rank-temperature 3.0: .*stored T \\(4.0\\) or.*T = 1"):
        select(stored["t4"], tmp_path / "s2", per_class=3, rank_temperature=3.0)
    assert main(["select", "--logits", str(old), "--out", str(tmp_path / "s3"), "--per-class", "3",
                 "--rank-temperature", "1"]) == 2


def test_schema_1_logits_stay_readable_verifiable_and_selectable(tmp_path, monkeypatch):
    monkeypatch.setattr(factories, "SCHEMA_VERSION", 1)  # the factory writes what kdpipe wrote before lse1
    path = make_logits(tmp_path / "v1", random_shards(np.random.default_rng(1), 2, 20, 10), temperature=2.0)
    logits = open_logits(path)
    table = logits.read_part(0)
    assert read_metadata(table.schema)["schema_version"] == 1 and LSE1 not in table.schema.names
    assert logits.params["parquet_schema_version"] == 1 and table.num_rows == 20
    assert main(["verify", str(path)]) == 0
    assert mf.load(select(path, tmp_path / "sel", per_class=2), kind="selection").totals["rows"] == 20


def test_smallcnn_width_is_an_arch_name_the_card_rebuilds(tmp_path):
    wide, narrow = build_model("smallcnn-64", 10), build_model("smallcnn", 10)
    assert wide.fc.in_features == 256 and narrow.fc.in_features == 128
    card = write_card(tmp_path / "c", wide, arch="smallcnn-64", class_names=NAMES, preprocess=DIGITS_PP, stage="t")
    model, manifest = load_classifier(card)
    assert manifest.params["arch"] == "smallcnn-64" and model.fc.in_features == 256
    with pytest.raises(ValueError, match="smallcnn-W takes a width W in 1..1024"):
        build_model("smallcnn-0", 10)


def test_adamw_changes_the_fingerprint_only_when_chosen():
    default = TrainConfig()
    assert "optimizer" not in default.fingerprint_params()
    assert sha256_json(default.fingerprint_params()) == sha256_json(
        dataclasses.replace(default, optimizer="sgd").fingerprint_params())
    adamw = dataclasses.replace(default, optimizer="adamw", weight_decay=0.05)
    assert adamw.fingerprint_params()["optimizer"] == "adamw"
    plan = type("Plan", (), {"steps_per_epoch": 4})()
    optimizer, _ = _optimizer(torch.nn.Linear(3, 2), adamw, plan)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="--optimizer 'adam'"):
        TrainConfig(optimizer="adam")
    args = build_parser().parse_args(["train", "--train", "M", "--out", "O", "--optimizer", "adamw"])
    assert args.optimizer == "adamw"


def test_adamw_trains_and_is_recorded_in_the_card(tmp_path):
    data = digits_data(tmp_path / "data", shard_size=50, samples=50)
    out = tmp_path / "student"
    assert main(["train", "--train", str(data), "--out", str(out), "--optimizer", "adamw", "--lr", "0.003",
                 "--epochs", "1", "--batch-size", "16", "--threads", "1"]) == 0
    assert mf.load(out, kind="model").params["training"]["optimizer"] == "adamw"


def test_first_draw_takes_the_first_n_of_each_class_in_source_order_whatever_the_seed():
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 2, 2]
    rules = parse_split("labeled=2/class:first,rest=rest")
    for seed in (0, 7):
        assert assign_splits(labels, rules, seed)["labeled"] == [0, 1, 2, 3, 8, 9]
    seeded = [assign_splits(labels, parse_split("labeled=2/class,rest=rest"), s)["labeled"] for s in range(6)]
    assert len({tuple(s) for s in seeded}) > 1  # the seeded draw does depend on the seed
    with pytest.raises(InputError, match="name=N/class:first"):
        parse_split("labeled=2/class:last")


def test_scores_never_exceed_one_when_float16_rounds_a_logit_above_its_normaliser():
    z = np.array([[10.004]], dtype=np.float16)  # stored as 10.0078: above the float32 lse1 10.004
    lse1 = np.array([10.004], np.float32)
    assert float(z[0, 0]) > float(lse1[0]) and exact_scores(z, lse1, 1.0)[0, 0] == np.float32(1.0)

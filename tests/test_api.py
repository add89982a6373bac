"""kdpipe's public API and the files other tools read: soft targets at any T' against a dense reference, batches
and joins, the webdataset stage's errors, ``kd_loss``'s refusals, light imports; the dataset card, timm's
``_info.json`` and reshard's ``num_classes`` written by the real stages and checked by ``kdpipe verify``;
``kdpipe show`` and ``kdpipe export``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import kdpipe
from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.verify import verify
from stages.artifacts.checks import CHECKS
from stages.artifacts.export import ExportOptions, export
from stages.artifacts.logits_format import dense_targets
from stages.artifacts.sidecars import with_sidecars
from stages.dedup.stage import dedup
from stages.ingest.stage import ingest
from stages.reshard.stage import iter_training_samples, reshard
from stages.select.stage import select
from stages.shardio import ShardStats, read_shard
from tests.factories import make_logits, random_shards

REPO = Path(__file__).resolve().parents[1]
C, K, T = 10, 4, 2.0


def _softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp(z / temperature - (z / temperature).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A logits artifact of known full logits (3 shards x 30 rows, C = 10, top-4 at T = 2), and the logits."""
    root = tmp_path_factory.mktemp("api")
    shards = random_shards(np.random.default_rng(1), 3, 30, C)
    return {"manifest": make_logits(root / "logits", shards, topk=K, temperature=T), "shards": shards,
            "root": root}


def _reference(full, shard: int = 0) -> tuple[np.ndarray, pa.Table]:
    logits = kdpipe.open_logits(full["manifest"])
    return full["shards"][shard][1].astype(np.float64), logits.read_part(shard)


def test_at_the_stored_temperature_targets_are_the_trainers_and_the_full_softmax_on_stored_classes(full):
    z, part = _reference(full)
    logits = kdpipe.open_logits(full["manifest"])
    sparse = logits.soft_targets(part, dense=False)
    truth = _softmax(z, T)
    stored = np.take_along_axis(truth, sparse.indices, axis=1)
    np.testing.assert_allclose(sparse.probs, stored, rtol=1e-5)
    np.testing.assert_allclose(sparse.residual, 1 - stored.sum(axis=1), atol=1e-6)
    columns = [np.stack(part.column(c).to_pylist()) for c in ("topk_index", "topk_logit")]
    for policy in ("exact", "renorm"):
        assert np.array_equal(logits.soft_targets(part, policy=policy),
                              dense_targets(*columns, part.column("lse").to_numpy(), T, C, policy))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 10.0])
def test_at_another_temperature_exact_is_exact_when_the_unstored_logits_are_equal(tmp_path, temperature):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20, C)) * 3
    order = np.argsort(-z, axis=1)
    rest = order[:, K:]
    np.put_along_axis(z, rest, np.take_along_axis(z, rest, axis=1).mean(axis=1, keepdims=True), axis=1)
    manifest = make_logits(tmp_path / "l", [([f"k{i}" for i in range(20)], z.astype(np.float32))], topk=K,
                           temperature=T)
    logits = kdpipe.open_logits(manifest)
    dense = logits.soft_targets(logits.read_part(0), temperature)
    np.testing.assert_allclose(dense, _softmax(z.astype(np.float32).astype(np.float64), temperature), atol=2e-6)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_renorm_is_the_softmax_of_the_stored_classes_and_k_equal_c_is_the_full_softmax(full, tmp_path,
                                                                                      temperature):
    z, part = _reference(full)
    logits = kdpipe.open_logits(full["manifest"])
    sparse = logits.soft_targets(part, temperature, dense=False, policy="renorm")
    top = np.take_along_axis(z.astype(np.float32).astype(np.float64), sparse.indices, axis=1)
    np.testing.assert_allclose(sparse.probs, _softmax(top, temperature), rtol=1e-5)
    assert not sparse.residual.any()
    every = make_logits(tmp_path / "all", full["shards"][:1], topk=C, temperature=T)
    whole = kdpipe.open_logits(every)
    for policy in ("exact", "renorm"):
        np.testing.assert_allclose(whole.soft_targets(whole.read_part(0), temperature, policy=policy),
                                   _softmax(z.astype(np.float32).astype(np.float64), temperature), atol=2e-6)


def test_exact_at_another_temperature_keeps_the_order_and_sums_to_one(full):
    _, part = _reference(full)
    logits = kdpipe.open_logits(full["manifest"])
    for temperature in (1.0, 5.0):
        sparse = logits.soft_targets(part, temperature, dense=False)
        assert (np.diff(sparse.probs, axis=1) <= 1e-7).all()
        np.testing.assert_allclose(sparse.probs.sum(axis=1) + sparse.residual, 1.0, atol=1e-6)
    hotter, colder = (logits.soft_targets(part, t, dense=False).residual for t in (5.0, 1.0))
    assert (hotter > colder).all()     # a higher temperature moves mass to the unstored classes


def test_batches_come_as_arrow_numpy_and_torch_with_the_same_values(full):
    logits = kdpipe.open_logits(full["manifest"])
    arrow = list(logits.batches(batch_rows=25))
    numpy = list(logits.batches(format="numpy", batch_rows=25))
    torch_batches = list(logits.batches(format="torch", batch_rows=25))
    assert [b.num_rows for b in arrow] == [25, 5] * 3 and len(numpy) == len(torch_batches) == 6
    assert numpy[0]["topk_index"].shape == (25, K) and numpy[0]["key"].tolist() == arrow[0]["key"].to_pylist()
    assert torch_batches[0]["topk_logit"].numpy().tolist() == numpy[0]["topk_logit"].tolist()
    assert torch_batches[0]["key"] == numpy[0]["key"].tolist()
    with pytest.raises(InputError, match="format 'pandas'"):
        next(logits.batches(format="pandas"))


def test_join_keeps_the_callers_order_and_says_what_is_missing(full):
    logits = kdpipe.open_logits(full["manifest"])
    keys = ["img-002-00007", "nope", "img-000-00003"]
    left = logits.join({"key": keys, "mine": [1, 2, 3]}, how="left")
    inner = logits.join({"key": keys, "mine": [1, 2, 3]})
    assert left["key"].to_pylist() == keys and left["lse"].null_count == 1
    assert inner["mine"].to_pylist() == [1, 3]
    rows = {r["key"]: r for p in range(3) for r in logits.read_part(p).to_pylist()}
    assert inner["topk_logit"].to_pylist() == [rows[k]["topk_logit"] for k in (keys[0], keys[2])]
    with pytest.raises(InputError, match="how='outer'"):
        logits.join({"key": keys}, how="outer")
    with pytest.raises(InputError, match="lse"):
        logits.join({"key": keys, "lse": [0.0] * 3})


def test_soft_targets_of_a_record_and_of_rows_without_metadata(full):
    _, part = _reference(full)
    row = part.slice(0, 1).to_pylist()[0]
    record = {**row, "temperature": T, "num_classes": C}
    logits = kdpipe.open_logits(full["manifest"])
    assert np.array_equal(kdpipe.soft_targets(record), logits.soft_targets(part)[0])
    bare = part.replace_schema_metadata(None)
    with pytest.raises(InputError, match="pass num_classes="):
        kdpipe.soft_targets(bare)
    assert kdpipe.soft_targets(bare, num_classes=C, stored_temperature=T).shape == (30, C)
    with pytest.raises(InputError, match="class ids outside"):
        kdpipe.soft_targets(record, num_classes=3)


def test_importing_kdpipe_and_reading_soft_targets_loads_neither_torch_nor_webdataset(full):
    code = ("import json, sys, kdpipe\n"
            f"logits = kdpipe.open_logits({str(full['manifest'])!r})\n"
            "print(logits.soft_targets(next(logits.batches())).shape)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'webdataset', 'matplotlib') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.splitlines() == [f"(30, {C})", "[]"]


def test_kd_loss_refuses_what_it_cannot_compute():
    import torch

    logits = torch.zeros(2, C)
    with pytest.raises(InputError, match="pass labels="):
        kdpipe.kd_loss(logits, np.full((2, C), 0.1), T, alpha=0.5)
    with pytest.raises(InputError, match="alpha must be in"):
        kdpipe.kd_loss(logits, None, T, alpha=2.0)
    with pytest.raises(InputError, match="targets of shape"):
        kdpipe.kd_loss(logits, np.full((2, 3), 0.1), T)
    hard = kdpipe.kd_loss(logits, None, T, alpha=0.0, labels=[0, 1])
    assert float(hard) == pytest.approx(np.log(C))


def _sample(record: dict | None, cls: bytes = b"3") -> dict:
    sample = {"__key__": "s1", "__url__": "x.tar", "png": "IMAGE", "cls": cls}
    if record is not None:
        sample["json"] = json.dumps(record).encode()
    return sample


@pytest.mark.parametrize("record, message", [
    (None, "no json member"),
    ({"topk_index": [1, 2], "topk_logit": [2.0, 1.0], "lse": 3.0, "temperature": 2.0}, "no num_classes"),
    ({"topk_index": [1, 12], "topk_logit": [2.0, 1.0], "lse": 3.0, "temperature": 2.0, "num_classes": 10},
     "class ids outside"),
    ({"topk_index": [1, 2], "topk_logit": [2.0], "lse": 3.0, "temperature": 2.0, "num_classes": 10}, "shapes"),
    ({"topk_index": [1, 2], "topk_logit": [2.0, 1.0], "lse": "nan", "temperature": 2.0, "num_classes": 10},
     "non-finite"),
])
def test_the_webdataset_stage_names_the_sample_and_what_is_wrong(record, message):
    stage = kdpipe.wds_targets()
    with pytest.raises(InputError, match=message) as caught:
        list(stage([_sample(record)]))
    assert "'s1'" in str(caught.value) and "x.tar" in str(caught.value)
    skipped = kdpipe.wds_targets(handler=lambda exc: True)
    assert list(skipped([_sample(record)])) == []


def test_the_webdataset_stage_yields_image_label_and_targets_raw_or_decoded():
    record = {"topk_index": [1, 2], "topk_logit": [2.0, 1.0], "lse": 3.0, "temperature": 2.0, "num_classes": 4}
    image, label, dense = next(kdpipe.wds_targets()([_sample(record)]))
    assert image == "IMAGE" and label == 3 and dense.shape == (4,)
    decoded = {**_sample(record), "json": record, "cls": 3}
    _, label, sparse = next(kdpipe.wds_targets(dense=False)([decoded]))
    assert label == 3 and sparse.indices.tolist() == [1, 2]
    assert sparse.probs.tolist() == pytest.approx([np.exp(1 - 3), np.exp(0.5 - 3)], rel=1e-6)
    with pytest.raises(InputError, match="label 5 outside"):
        next(kdpipe.wds_targets()([_sample(record, b"5")]))
    assert next(kdpipe.wds_targets()([{**_sample(record), "cls": None}]))[1] == -1


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """digits pool (3 shards of 30) -> logits with the real keys -> the real select -> the real reshard."""
    root = tmp_path_factory.mktemp("api-chain")
    made = ingest("digits", root / "data", shard_size=30, split="pool=90,rest=rest", seed=0)
    dataset = mf.load(made["pool"])
    rng = np.random.default_rng(3)
    shards = []
    for entry in dataset.files:
        keys = [k for k, _ in read_shard(dataset.file_path(entry), ShardStats("x"))]
        shards.append((keys, rng.normal(size=(len(keys), C)).astype(np.float32) * 3))
    emb = [rng.normal(size=(len(k), 8)).astype(np.float32) for k, _ in shards]
    emb = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in emb]
    logits = make_logits(root / "logits", shards, topk=K, temperature=T, data=dataset.path, embeddings=emb)
    selection = select(logits, root / "select", per_class=5, top_p=2, soft_targets=True)
    exclusion = dedup(logits, root / "dedup", threshold=0.99)
    resharded = reshard(selection, root / "train", shard_size=20).manifest
    return {"root": root, "logits": logits, "select": selection, "dedup": exclusion, "reshard": resharded}


@pytest.mark.parametrize("name", ["select", "dedup"])
def test_parquet_stages_write_a_card_listing_exactly_their_parts(chain, name):
    manifest = mf.load(chain[name])
    text = (manifest.folder / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": [f["path"] for f in manifest.files]}]}]
    assert manifest.id in text and verify(manifest.path, CHECKS) == []


def test_reshard_writes_timms_info_and_num_classes_in_every_sample(chain):
    manifest = mf.load(chain["reshard"])
    info = json.loads((manifest.folder / "_info.json").read_text())
    split = info["splits"]["train"]
    assert split["filenames"] == [f["path"] for f in manifest.files]
    assert split["shard_lengths"] == [f["samples"] for f in manifest.files]
    assert split["num_samples"] == manifest.totals["samples"] and info["num_classes"] == C
    logits = kdpipe.open_logits(chain["logits"])
    stored = {r["key"]: r for p in range(logits.num_parts) for r in logits.read_part(p).to_pylist()}
    for key, fields in iter_training_samples(manifest.path):
        record = json.loads(fields["json"])
        assert record["num_classes"] == C
        row = stored[record["source_key"]]
        assert np.array_equal(kdpipe.soft_targets(record), logits.soft_targets(pa.Table.from_pylist([row]))[0])


@pytest.mark.parametrize("name, sidecar", [("select", "README.md"), ("reshard", "_info.json"),
                                           ("dedup", "README.md")])
def test_verify_names_a_sidecar_that_differs_from_its_manifest(chain, tmp_path, name, sidecar):
    import shutil

    folder = mf.load(chain[name]).folder
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    path = copy / sidecar
    path.write_text(path.read_text().replace("part-000000", "part-000009"))
    problems = verify(copy, CHECKS)
    assert len(problems) == 1 and str(path) in problems[0] and "differs" in problems[0]
    path.unlink()
    assert verify(copy, CHECKS) == []     # an artifact made before sidecars existed is still intact


def test_a_finalize_rerun_rewrites_a_deleted_card_and_another_artifacts_card_is_left_alone(chain, tmp_path):
    folder = mf.load(chain["select"]).folder
    card = (folder / "README.md").read_bytes()
    (folder / "README.md").unlink()
    select(chain["logits"], folder, per_class=5, top_p=2, soft_targets=True)
    assert (folder / "README.md").read_bytes() == card
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"id": "0" * 64}))
    (other / "README.md").write_text("theirs")
    data = mf.load(chain["select"]).data
    assert with_sidecars(other, lambda receipts: data)([]) is data
    assert (other / "README.md").read_text() == "theirs"


def test_show_prints_kind_lineage_params_counts_and_first_rows(chain, capsys):
    assert main(["show", str(chain["select"]), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    first = pq.read_table(mf.load(chain["select"]).folder / "part-000000.parquet").slice(0, 2)
    assert out.startswith("selection: ") and "lineage:" in out and "logits" in out and "per_class" in out
    assert all(key in out for key in first["key"].to_pylist()) and "for other tools: README.md" in out
    assert main(["show", str(chain["logits"]), "--rows", "1"]) == 0
    assert "other classes" in capsys.readouterr().out
    assert main(["show", str(chain["reshard"]), "--rows", "1"]) == 0
    assert "num_classes=10" in capsys.readouterr().out and main(["show", str(chain["root"] / "nothing")]) == 2


def test_export_follows_timms_columns_in_every_format(chain, tmp_path):
    logits = kdpipe.open_logits(chain["logits"])
    part = logits.read_part(0)
    expected = logits.soft_targets(part, 1.0, dense=False)
    options = ExportOptions(topk=2, temperature=1.0, label_type="name", separate_cols=True)
    assert export(chain["logits"], tmp_path / "l.parquet", options) == 90
    table = pq.read_table(tmp_path / "l.parquet").slice(0, part.num_rows)
    assert table.column_names == ["filename", "label_0", "label_1", "prob_0", "prob_1"]
    assert table["label_1"].to_pylist() == [str(c) for c in expected.indices[:, 1]]
    np.testing.assert_array_equal(table["prob_0"].to_numpy(), expected.probs[:, 0])
    assert export(chain["logits"], tmp_path / "l.json", ExportOptions(output_type="logit")) == 90
    rows = json.loads((tmp_path / "l.json").read_text())
    assert rows[0] == {"filename": part["key"][0].as_py(), "index": part["topk_index"][0].as_py(),
                       "logit": [float(str(np.float32(v))) for v in part["topk_logit"][0].as_py()]}
    with pytest.raises(InputError, match="--topk 9"):
        export(chain["logits"], tmp_path / "x.csv", ExportOptions(topk=9))
    with pytest.raises(InputError, match="export takes logits or selection"):
        export(chain["reshard"], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("argv, options", [(["show", "M"], "ShowOptions"), (["export", "M", "--output", "F"],
                                                                          "ExportOptions")])
def test_show_and_export_flags_left_out_take_their_dataclass_defaults(argv, options):
    import dataclasses

    from pipeline.cli import build_parser
    from pipeline.options import from_args
    from stages.artifacts import describe
    from stages.artifacts import export as export_module

    cls = getattr(describe, options, None) or getattr(export_module, options)
    args = build_parser().parse_args(argv)
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(cls))
    assert from_args(cls, args) == cls()


def test_show_and_export_load_neither_torch_nor_webdataset():
    code = ("import importlib, json, sys\n"
            "for name in ('pipeline.cli.commands.show', 'pipeline.cli.commands.export', 'stages.artifacts.describe',"
            " 'stages.artifacts.export'): importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'webdataset', 'matplotlib') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout) == []

"""The logits stage on the bundled digits: exact top-K/lse against a plain forward, reader targets, identity."""


import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.cli import main
from stages.artifacts.logits_format import (
    dense_targets,
    fixed_list_to_numpy,
    read_metadata,
    residual_mass,
    softened_topk,
)
from stages.artifacts.logits_reader import open_logits
from stages.logits.stage import compute_logits
from tests.test_logits_support import digits_data, plain_logits, shard_images, train_card

T, K = 2.5, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("logits")
    data = digits_data(root / "data", shard_size=90, samples=400)
    card = train_card(root / "teacher", data, steps=6)
    return root, data, card


@pytest.fixture(scope="module")
def artifact(setup):
    root, data, card = setup
    return compute_logits(data, card, root / "logits", topk=K, temperature=T, num_workers=0, loader_batch=13)


@pytest.fixture(scope="module")
def reference(setup):
    """Per shard: keys and full logits of a plain float32 forward of the whole shard at once."""
    _, data, card = setup
    return [(keys, plain_logits(card, views)) for keys, views in shard_images(data)]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stored_topk_and_logits_equal_a_plain_full_forward(setup, reference, artifact, dtype, tmp_path):
    root, data, card = setup
    path = artifact if dtype == "float16" else compute_logits(data, card, tmp_path / "l32", topk=K, temperature=T,
                                                              logit_dtype="float32", num_workers=0)
    tol = 2e-3 if dtype == "float16" else 1e-4
    logits = open_logits(path)
    assert logits.num_parts == 5 and logits.params["logit_dtype"] == dtype
    for index, (keys, full) in enumerate(reference):
        table = logits.read_part(index)
        assert table.column("key").to_pylist() == keys and set(table.column("shard").to_pylist()) == {index}
        assert str(table.schema.field("topk_index").type.value_type) == "int16"
        idx = torch.from_numpy(fixed_list_to_numpy(table.column("topk_index"), K).astype(np.int64))
        val = torch.from_numpy(fixed_list_to_numpy(table.column("topk_logit"), K).astype(np.float32))
        torch.testing.assert_close(val, full.gather(1, idx), rtol=tol, atol=tol)
        kth = torch.topk(full, K, dim=1).values  # the stored classes are a top-K set: same values, in order
        torch.testing.assert_close(val, kth, rtol=tol, atol=tol)
        lse = torch.from_numpy(table.column("lse").to_numpy().copy())
        torch.testing.assert_close(lse, torch.logsumexp(full / T, dim=1), rtol=1e-5, atol=1e-5)
        probs = softened_topk(val.numpy(), lse.numpy(), T)
        assert (probs.sum(axis=1) <= 1 + 1e-3).all() and (residual_mass(probs) >= 0).all()


def test_parquet_metadata_and_manifest_say_how_the_teacher_saw_the_images(setup, artifact):
    _, data, card = setup
    manifest = mf.load(artifact, kind="logits")
    meta = read_metadata(pq.ParquetFile(artifact.parent / "part-000002.parquet").schema_arrow)
    teacher = mf.load(card)
    assert meta["temperature"] == T and meta["topk"] == K and meta["num_classes"] == 10 and meta["shard"] == 2
    assert meta["teacher_id"] == teacher.id == manifest.params["teacher_id"]
    assert meta["dataset_id"] == mf.load(data).id and meta["preprocess"] == teacher.params["preprocess"]
    assert manifest.params["views"] == {"count": 1, "policy": "centre", "aug": None}
    assert {i["role"]: i["id"] for i in manifest.inputs} == {"data": mf.load(data).id, "teacher": teacher.id}
    assert manifest.totals["samples"] == manifest.totals["rows"] == 400
    assert pq.ParquetFile(artifact.parent / "part-000000.parquet").metadata.row_group(0).column(0).compression \
        == "ZSTD"


def test_reader_dense_targets_equal_the_softmax_at_t(reference, artifact):
    logits = open_logits(artifact)
    batches = list(logits.iter_batches(columns=["topk_index", "topk_logit", "lse"], batch_rows=50, parts=[1]))
    full = reference[1][1].double()
    assert sum(b.num_rows for b in batches) == full.shape[0]
    batch = batches[0]
    idx = fixed_list_to_numpy(batch.column("topk_index"), K)
    val = fixed_list_to_numpy(batch.column("topk_logit"), K)
    lse = batch.column("lse").to_numpy()
    exact = dense_targets(idx, val, lse, T, 10, policy="exact")
    softmax = torch.softmax(full[:50] / T, dim=1).numpy()
    np.testing.assert_allclose(np.take_along_axis(exact, idx.astype(np.int64), 1),
                               np.take_along_axis(softmax, idx.astype(np.int64), 1), atol=2e-3)
    np.testing.assert_allclose(exact.sum(1), 1.0, atol=1e-5)
    renorm = dense_targets(idx, val, lse, T, 10, policy="renorm")
    np.testing.assert_allclose(renorm.sum(1), 1.0, atol=1e-5)
    assert (np.count_nonzero(renorm, axis=1) <= K).all()


def test_parts_are_byte_identical_across_workers_loader_batches_prefetch_and_tasks(setup, artifact, tmp_path):
    root, data, card = setup
    out = tmp_path / "split"
    for task in range(3):  # three array tasks, two decode workers, other loader batch and prefetch
        result = compute_logits(data, card, out, topk=K, temperature=T, task_index=task, num_tasks=3,
                                num_workers=2, loader_batch=32, prefetch=1)
    assert result is not None
    for index in range(5):
        name = f"part-{index:06d}.parquet"
        assert (out / name).read_bytes() == (artifact.parent / name).read_bytes(), name
    assert mf.load(result).id == mf.load(artifact).id


def test_a_rerun_skips_committed_parts_and_keeps_the_manifest(setup, artifact):
    root, data, card = setup
    before = {p.name: p.stat().st_mtime_ns for p in artifact.parent.glob("part-*.parquet")}
    again = compute_logits(data, card, root / "logits", topk=K, temperature=T, num_workers=0)
    assert again == artifact
    assert {p.name: p.stat().st_mtime_ns for p in artifact.parent.glob("part-*.parquet")} == before


def test_embeddings_are_l2_normalised_float16_penultimate_features(setup, tmp_path):
    root, data, card = setup
    path = compute_logits(data, card, tmp_path / "emb", topk=K, temperature=T, embeddings=True, num_workers=0)
    logits = open_logits(path)
    table = logits.read_part(4)
    assert logits.params["embedding_dim"] == 128 and str(table.schema.field("embedding").type.value_type) == "halffloat"
    emb = fixed_list_to_numpy(table.column("embedding"), 128).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)


def test_a_model_card_is_accepted_and_the_cli_commits_and_verifies(setup, tmp_path):
    root, data, _ = setup
    card = train_card(tmp_path / "student", None, steps=0, seed=3, kind="model")
    out = tmp_path / "cli"
    assert main(["logits", "--data", str(data), "--teacher", str(card), "--topk", "3", "--temperature", "1",
                 "--out", str(out), "--num-workers", "0"]) == 0
    assert mf.load(out / "manifest.json").params["teacher_kind"] == "model"
    assert main(["verify", str(out / "manifest.json")]) == 0

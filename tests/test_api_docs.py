"""docs/api.md runs as written, and what its examples show holds: a plain webdataset + torch loop over reshard
output gets the trainer's loss on the same batch, timm's ``wds/`` reader loads reshard output, Hugging Face
``load_dataset(folder)`` loads a logits and a selection artifact with their row counts, and DuckDB's softened
probabilities equal ``soft_targets`` for the same rows.

The docs' ``python`` blocks run in order in one namespace, and each ``kdpipe ...`` line of its ``bash`` blocks
through the real command line, from a folder holding a small real chain in the demo's layout.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shlex

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.cli import main
from stages.shardio import ShardStats, parse_label, read_shard
from stages.train.config import DIGITS_PREPROCESS
from stages.train.data import DataPlan, collate, decode_sample
from stages.train.losses import distillation_loss, teacher_distribution
from tests.api_chain import DOCS, TEMPERATURE, blocks, make_chain


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
    """Build the chain, then run every example of docs/api.md from its folder; the namespace and manifests."""
    root = tmp_path_factory.mktemp("api-docs")
    chain = make_chain(root)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "HF_DATASETS_CACHE": str(root / "hf" / "datasets")}
    namespace: dict = {"__name__": "docs_api"}
    with pytest.MonkeyPatch.context() as patch, contextlib.chdir(root):
        for name, value in env.items():
            patch.setenv(name, value)
        for block in blocks("bash"):
            for line in block.splitlines():
                if line.startswith("kdpipe "):
                    assert main(shlex.split(line)[1:]) == 0, line
        for number, block in enumerate(blocks("python")):
            exec(compile(block, f"docs/api.md python block {number}", "exec"), namespace)
    return {"ns": namespace, "chain": chain, "root": root}


def _trainer_batch(reshard_manifest, size: int) -> dict:
    """The first ``size`` samples of the first shard through the trainer's own decode + collate."""
    data = mf.load(reshard_manifest)
    entry = data.files[0]
    plan = DataPlan(shards=(), num_classes=10, batch_size=size, seed=0, world=1, streams=1,
                    preprocess=DIGITS_PREPROCESS, augment=None, need_label=True, need_soft=True, topk=5)
    samples = []
    for key, fields in read_shard(data.file_path(entry), ShardStats("x"), entry["sha256"]):
        samples.append(decode_sample({"__key__": key, "fields": fields, "joined": None, "pass": 0}, plan, 0))
        if len(samples) == size:
            break
    return collate(samples, 0, [])


def _trainer_loss(batch: dict, logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """What ``stages.train.loop._step`` computes for ``--loss mix --alpha alpha --residual exact``."""
    temp = batch["temperature"]
    probs = teacher_distribution(batch["topk_index"], batch["topk_logit"], batch["lse"], temp, 10, "exact")
    return distillation_loss("mix", logits, batch["labels"], probs, temp, alpha, 0.0)


def test_the_user_loop_trains_and_its_loss_is_the_trainers_on_the_same_batch(docs_run):
    ns = docs_run["ns"]
    with contextlib.chdir(docs_run["root"]):
        images, labels, targets = next(iter(ns["loader"]))
    batch = _trainer_batch(docs_run["chain"]["reshard"], len(labels))
    assert labels.tolist() == batch["labels"].tolist()          # the same samples, in the same order
    with torch.no_grad():
        logits = ns["student"](images)
        ours = ns["kdpipe"].kd_loss(logits, targets, ns["T"], alpha=0.5, labels=labels)
        theirs = _trainer_loss(batch, logits, 0.5)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6, abs=1e-7)
    assert np.isfinite(ns["loss"].item()) and ns["epoch"] == 1
    assert ns["student"][1].weight.grad is not None and float(ns["student"][1].weight.detach().abs().sum()) > 0


def test_sparse_targets_batched_by_the_dataloader_give_the_same_loss(docs_run):
    ns = docs_run["ns"]
    wds, kdpipe = ns["wds"], ns["kdpipe"]
    with contextlib.chdir(docs_run["root"]):
        data = (wds.WebDataset(ns["urls"], shardshuffle=False).decode("pilrgb")
                .compose(kdpipe.wds_targets(dense=False)).map_tuple(ns["to_tensor"], None, None))
        images, _, sparse = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
    batch = _trainer_batch(docs_run["chain"]["reshard"], 8)
    assert isinstance(sparse, kdpipe.Sparse) and sparse.indices.shape == (8, 5)
    with torch.no_grad():
        logits = ns["student"](images)
        ours = kdpipe.kd_loss(logits, sparse, ns["T"], alpha=1.0)
        theirs = distillation_loss("soft", logits, None, teacher_distribution(
            batch["topk_index"], batch["topk_logit"], batch["lse"], batch["temperature"], 10), batch["temperature"])
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def test_the_pool_joined_with_its_logits_by_key_gives_the_stored_rows(docs_run):
    ns = docs_run["ns"]
    first = mf.load(docs_run["chain"]["logits"])
    row = pq.read_table(first.file_path(first.files[0])).slice(0, 1).to_pylist()[0]
    expected = np.exp(np.asarray(row["topk_logit"], np.float64) / TEMPERATURE - row["lse"])
    assert ns["label"] == -1 and ns["indices"].tolist() == row["topk_index"]
    assert np.allclose(ns["probs"], expected, rtol=1e-6)
    assert float(ns["residual"]) == pytest.approx(1 - expected.sum(), abs=1e-6)


def test_timm_create_dataset_loads_reshard_output_with_its_labels(docs_run):
    from timm.data import create_dataset

    manifest = mf.load(docs_run["chain"]["reshard"])
    with contextlib.chdir(docs_run["root"]):
        labels = [label for _, label in create_dataset("wds/kdpipe", root="demo-out/reshard", split="train")]
    stored = [parse_label(fields, 10) for entry in manifest.files
              for _, fields in read_shard(manifest.file_path(entry), ShardStats("x"))]
    assert labels == stored and len(labels) == manifest.totals["samples"]
    assert docs_run["ns"]["hard_image"].size == (8, 8) and np.isfinite(docs_run["ns"]["timm_loss"].item())


def test_load_dataset_loads_the_parts_of_logits_and_selection_and_nothing_else(docs_run):
    ns, chain = docs_run["ns"], docs_run["chain"]
    assert ns["logits_ds"].num_rows == mf.load(chain["logits"]).totals["rows"] == 240
    assert ns["selection_ds"].num_rows == mf.load(chain["select"]).totals["rows"]
    assert ns["logits_ds"].column_names == ["key", "shard", "topk_index", "topk_logit", "lse", "lse1"]
    assert ns["selection_ds"]["key"] == pq.read_table(mf.load(chain["select"]).folder / "part-000000.parquet",
                                                      columns=["key"]).column("key").to_pylist()


def test_duckdb_softened_probabilities_equal_soft_targets_for_the_same_rows(docs_run):
    ns = docs_run["ns"]
    rows, same = ns["rows"], ns["same"]
    assert rows.num_rows == 8 and rows["key"].to_pylist() == sorted(rows["key"].to_pylist())
    assert np.array(rows["topk_index"].to_pylist()).tolist() == same.indices.tolist()
    np.testing.assert_allclose(np.array(rows["probs"].to_pylist()), same.probs, rtol=1e-6)
    assert ns["frame"].shape == (240, 6)


def test_the_exports_of_the_docs_hold_the_stored_rows(docs_run):
    root, chain = docs_run["root"], docs_run["chain"]
    lines = (root / "logits.csv").read_text().splitlines()
    assert lines[0] == "filename,label,prob" and len(lines) == 241
    logits = docs_run["ns"]["logits"]
    first = logits.read_part(0)
    name, label, prob = next(csv.reader([lines[1]]))
    expected = logits.soft_targets(first.slice(0, 1), dense=False)
    assert name == first["key"][0].as_py() and json.loads(label) == [str(c) for c in expected.indices[0][:3]]
    np.testing.assert_allclose(json.loads(prob), expected.probs[0][:3], rtol=1e-6)
    exported = pq.read_table(root / "selection.parquet")
    selection = pq.read_table(mf.load(chain["select"]).folder / "part-000000.parquet")
    assert exported.column_names == ["filename", "index", "logit", "rank"]
    assert exported["filename"].to_pylist() == selection["key"].to_pylist()
    assert exported["index"].to_pylist() == selection["label"].to_pylist()
    own = [float(np.float32(z[i.index(lab)])) for z, i, lab in zip(selection["topk_logit"].to_pylist(),
                                                                  selection["topk_index"].to_pylist(),
                                                                  selection["label"].to_pylist())]
    assert exported["logit"].to_pylist() == own

def test_docs_api_is_linked_from_the_readme():
    assert "(docs/api.md)" in (DOCS.parent.parent / "README.md").read_text()

"""Growing a dataset without recomputation: ingest --base, logits --reuse, select over the merged logits.

The proof that reuse is safe: logits computed with --reuse are byte-identical, part by part, to logits
computed from scratch over the grown dataset, while the teacher only sees the new shards' images.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError
from stages.ingest.base import ingest_grown
from stages.logits import inference
from stages.logits.stage import compute_logits
from stages.select.stage import select
from tests.slurm_helpers import REPO
from tests.test_logits_support import digits_data, train_card

T, K = 2.0, 3
BASE_SAMPLES, PER_CLASS_NEW = 150, 4  # base: 3 shards (60, 60, 30); new: 40 images -> 2 shards (30, 10)


def _digit_folder(root: Path, per_class: int, offset: int = 1700, classes=range(10)) -> Path:
    """A labeled folder of class subfolders holding PNGs of bundled digits (keys unlike the base's)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        picks = [i for i in range(offset, len(digits.target)) if digits.target[i] == c][:per_class]
        for i in picks:
            buf = io.BytesIO()
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
            (root / str(c) / f"new{i}.png").write_bytes(buf.getvalue())
    return root


class _Counter:
    """Counts images through the teacher (wraps ``Engine.run``)."""

    def __init__(self):
        self.images = 0

    def wrap(self, run):
        def counted(engine, batch):
            self.images += int(batch.shape[0])
            return run(engine, batch)
        return counted


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("growth")
    base = digits_data(root / "base", shard_size=60, samples=BASE_SAMPLES)
    card = train_card(root / "teacher", base, steps=3)
    old = compute_logits(base, card, root / "old", topk=K, temperature=T, num_workers=0)
    src = _digit_folder(root / "newsrc", PER_CLASS_NEW)
    data = ingest_grown(str(src), root / "grown", base, shard_size=30)
    counter = _Counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference.Engine, "run", counter.wrap(inference.Engine.run))
        reused = compute_logits(data, card, root / "reused", topk=K, temperature=T, num_workers=0, reuse=old)
    scratch = compute_logits(data, card, root / "scratch", topk=K, temperature=T, num_workers=0)
    return {"root": root, "base": base, "card": card, "old": old, "src": src, "data": data, "reused": reused,
            "scratch": scratch, "forwarded": counter.images}


def test_the_grown_dataset_lists_the_base_shards_first_unchanged_then_the_new_ones(grown):
    base, data = mf.load(grown["base"]), mf.load(grown["data"])
    n = len(base.files)
    assert [(f["sha256"], f["samples"]) for f in data.files[:n]] == [(f["sha256"], f["samples"]) for f in base.files]
    assert [f["samples"] for f in data.files[n:]] == [30, 10]
    assert data.totals["samples"] == BASE_SAMPLES + 10 * PER_CLASS_NEW
    assert [(i["role"], i["id"]) for i in data.inputs] == [("base", base.id)]
    assert data.params["class_names"] == base.params["class_names"] and data.params["labeled"]
    for entry in data.files:  # every path stays inside the new folder
        assert Path(data.file_path(entry)).parent == data.folder
    assert main(["verify", str(grown["data"])]) == 0


def test_reuse_runs_the_teacher_on_the_new_shards_only_and_equals_a_from_scratch_run(grown):
    reused, scratch = mf.load(grown["reused"]), mf.load(grown["scratch"])
    assert grown["forwarded"] == 10 * PER_CLASS_NEW  # not one image of the base went through the teacher
    assert reused.files == scratch.files  # byte-identical parts (sha256, bytes, rows)
    assert reused.params == scratch.params and reused.totals == scratch.totals
    old = mf.load(grown["old"])
    assert [(i["role"], i["id"]) for i in reused.inputs][-1] == ("base", old.id)
    assert reused.inputs[:2] == scratch.inputs[:2]  # the same dataset and teacher
    receipts = [json.loads((reused.folder / "_parts" / f"part-{i:06d}.json").read_text())
                for i in range(len(reused.files))]
    assert [r["extra"].get("reused_from", {}).get("part") for r in receipts] == [0, 1, 2, None, None]
    assert all(r["extra"]["reused_from"]["logits_id"] == old.id for r in receipts[:3])
    assert main(["verify", str(grown["reused"])]) == 0


def test_select_over_the_merged_logits_equals_select_over_from_scratch_logits(grown, tmp_path):
    tables = []
    for name in ("reused", "scratch"):
        out = select(grown[name], tmp_path / name, per_class=8, top_p=2, soft_targets=True)
        sel = mf.load(out)
        tables.append(pq.read_table(sel.file_path(sel.files[0])))
    assert tables[0].num_rows > 0 and tables[0].equals(tables[1])
    assert set(tables[0].column("shard").to_pylist()) & {3, 4}  # the new shards take part in the selection


def test_reuse_refuses_logits_made_with_other_parameters(grown, tmp_path):
    with pytest.raises(InputError, match="topk"):
        compute_logits(grown["data"], grown["card"], tmp_path / "l", topk=K + 1, temperature=T, num_workers=0,
                       reuse=grown["old"])


def test_a_damaged_old_part_is_computed_instead_and_the_result_is_unchanged(grown, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(grown["old"].parent, old)
    part = old / "part-000001.parquet"
    part.write_bytes(part.read_bytes()[:-40] + bytes(40))  # same size, other bytes: sha256 differs
    out = compute_logits(grown["data"], grown["card"], tmp_path / "l", topk=K, temperature=T, num_workers=0,
                         reuse=old)
    assert mf.load(out).files == mf.load(grown["scratch"]).files
    receipt = json.loads((tmp_path / "l" / "_parts" / "part-000001.json").read_text())
    assert "reused_from" not in receipt["extra"]


def test_growing_a_labeled_dataset_with_other_classes_is_refused(grown, tmp_path):
    src = _digit_folder(tmp_path / "src", 1, classes=range(3))
    with pytest.raises(InputError, match="same class subfolders"):
        ingest_grown(str(src), tmp_path / "g", grown["base"])


def test_kdpipe_run_of_a_growth_config_computes_logits_for_the_new_shards_only(grown, tmp_path):
    run = tmp_path / "run"
    stages = {
        "base": {"command": "ingest", "argv": ["digits"], "outputs": ["sub"],
                 "args": {"shard_size": 60, "split": f"sub={BASE_SAMPLES},rest=rest"}},
        "old_logits": {"command": "logits", "args": {"data": "${base}/sub", "teacher": str(grown["card"]),
                                                     "topk": K, "temperature": T, "num_workers": 0}},
        "grown": {"command": "ingest", "argv": [str(grown["src"])],
                  "args": {"base": "${base}/sub", "shard_size": 30}},
        "logits": {"command": "logits", "args": {"data": "${grown}", "teacher": str(grown["card"]), "topk": K,
                                                 "temperature": T, "num_workers": 0, "reuse": "${old_logits}"}},
    }
    path = tmp_path / "growth.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run), "workdir": str(REPO), "stages": stages}, sort_keys=False))
    assert main(["run", str(path), "--stages", "base,old_logits,grown"]) == 0
    counter = _Counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference.Engine, "run", counter.wrap(inference.Engine.run))
        assert main(["run", str(path), "--stages", "logits"]) == 0
    assert counter.images == 10 * PER_CLASS_NEW
    made = mf.load(run / "logits")
    assert made.files == mf.load(grown["scratch"]).files  # same dataset content -> the same parts
    assert made.inputs[-1]["role"] == "base" and made.inputs[-1]["id"] == mf.load(run / "old_logits").id


def test_logits_reuse_in_two_array_tasks_and_a_finalize_job_gives_the_same_manifest(grown, tmp_path):
    common = ["logits", "--data", str(grown["data"]), "--teacher", str(grown["card"]), "--topk", str(K),
              "--temperature", str(T), "--num-workers", "0", "--reuse", str(grown["old"].parent),
              "--out", str(tmp_path / "l")]
    for index in (0, 1):
        assert main([*common, "--task-index", str(index), "--num-tasks", "2", "--no-finalize"]) == 0
    assert not (tmp_path / "l" / "manifest.json").exists()
    assert main([*common, "--finalize"]) == 0
    assert mf.load(tmp_path / "l").id == mf.load(grown["reused"]).id  # base lineage kept by the finalize job


def test_multi_view_logits_are_reused_byte_identically(grown, tmp_path):
    from stages.views.spec import parse_aug

    aug = parse_aug("rrc:0.5-1,flip:0.5", views=2, seed=3)
    opts = {"topk": K, "temperature": T, "num_workers": 0, "aug": aug}
    old = compute_logits(grown["base"], grown["card"], tmp_path / "old", **opts)
    reused = compute_logits(grown["data"], grown["card"], tmp_path / "reused", reuse=old, **opts)
    scratch = compute_logits(grown["data"], grown["card"], tmp_path / "scratch", **opts)
    assert mf.load(reused).files == mf.load(scratch).files
    receipt = json.loads((tmp_path / "reused" / "_parts" / "part-000002.json").read_text())
    assert receipt["extra"]["reused_from"]["part"] == 2


@pytest.fixture(scope="module")
def unlabeled_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    from stages.ingest.stage import ingest

    return ingest("digits", root / "base", shard_size=40, split="unlabeled=60,rest=rest")["unlabeled"]


def test_growing_an_unlabeled_base_drops_the_new_sources_labels(unlabeled_base, tmp_path):
    from stages.shardio import ShardStats, read_shard

    src = _digit_folder(tmp_path / "src", 1)
    data = mf.load(ingest_grown(str(src), tmp_path / "g", unlabeled_base, shard_size=8))
    assert not data.params["labeled"] and [f["samples"] for f in data.files] == [40, 20, 8, 2]
    new = [fields for f in data.files[2:] for _, fields in read_shard(data.file_path(f), ShardStats("x"))]
    assert len(new) == 10 and all("cls" not in fields for fields in new)


def test_a_new_key_already_in_the_base_is_refused_naming_it(unlabeled_base, tmp_path):
    from stages.shardio import ShardStats, read_shard

    base = mf.load(unlabeled_base)
    taken = next(key for key, _ in read_shard(base.file_path(base.files[1]), ShardStats("x")))
    src = tmp_path / "flat"
    src.mkdir()
    png = next(f for _, f in read_shard(base.file_path(base.files[0]), ShardStats("x")))["png"]
    (src / f"{taken}.png").write_bytes(png)
    (src / "fresh.png").write_bytes(png)
    with pytest.raises(InputError, match="shard"):
        ingest_grown(str(src), tmp_path / "g", unlabeled_base)
    failure = json.loads((tmp_path / "g" / "_parts" / "part-000001.failed.json").read_text())
    assert taken in failure["message"] and not (tmp_path / "g" / "manifest.json").exists()


def test_the_example_configs_growth_step_uncommented_submits_after_the_old_logits(tmp_path):
    from pipeline.cli.submit import submit
    from pipeline.config import config_from_dict

    lines = (REPO / "pipeline" / "cli" / "configs" / "example-cluster.yaml").read_text().splitlines()
    growth = ("  # data_v2", "  # logits_v2", "  #   ", "  #          ")
    raw = yaml.safe_load("\n".join("  " + line[4:] if line.startswith(growth) else line for line in lines))
    cfg = config_from_dict(raw, [f"run_dir={tmp_path / 'run'}"])
    assert cfg.stages["logits_v2"].needs == ["data_v2", "logits", "teacher"]
    jobs = {j.key: j for j in submit(cfg, dry_run=True, skip_complete=False)}
    assert "logits:finalize" in jobs["logits_v2:tasks"].after
    assert "--reuse" in jobs["logits_v2:finalize"].script.read_text()
    assert "--base" in jobs["data_v2:tasks"].script.read_text()

"""``kdpipe logits`` as array tasks: each task commits its block, ``--finalize`` writes the manifest."""

import numpy as np

from pipeline import manifest as mf
from pipeline.cli import main
from tests.test_logits_support import NAMES, jpeg, make_dataset, train_card


def test_array_tasks_without_finalize_then_finalize_writes_the_manifest(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = make_dataset(tmp_path / "d", [[{"__key__": f"s{s}k{i}", "jpg": jpeg(rng)} for i in range(5)]
                                         for s in range(3)], NAMES)
    card = train_card(tmp_path / "t", None, steps=0)
    out = tmp_path / "out"
    common = ["logits", "--data", str(data), "--teacher", str(card), "--topk", "2", "--temperature", "4",
              "--out", str(out), "--num-workers", "0"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main(common + ["--no-finalize"]) == 0
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-00000{i}.parquet" for i in range(3)]
    assert not (out / "manifest.json").exists()
    assert main(common + ["--finalize", "--topk", "3"]) == 2  # other parameters: refused by fingerprint
    assert main(common + ["--finalize"]) == 0
    manifest = mf.load(out / "manifest.json", kind="logits")
    assert manifest.totals["rows"] == 15 and [f["rows"] for f in manifest.files] == [5, 5, 5]
    assert main(["verify", str(out / "manifest.json")]) == 0


def test_a_part_committed_by_another_task_meanwhile_is_skipped_and_the_rest_is_exact(tmp_path, monkeypatch):
    import stages.logits.stage as stage

    rng = np.random.default_rng(2)
    data = make_dataset(tmp_path / "d", [[{"__key__": f"s{s}k{i}", "jpg": jpeg(rng)} for i in range(6)]
                                         for s in range(3)], NAMES)
    card = train_card(tmp_path / "t", None, steps=0)
    clean = stage.compute_logits(data, card, tmp_path / "clean", topk=2, temperature=1.0, num_workers=0)
    out = tmp_path / "out"
    stage.compute_logits(data, card, out, topk=2, temperature=1.0, task_index=0, num_tasks=3, num_workers=0)
    real = stage._pending
    monkeypatch.setattr(stage, "_pending", lambda store, block, *a: ([0, 1, 2], [], []))  # 0 seen as pending
    path = stage.compute_logits(data, card, out, topk=2, temperature=1.0, num_workers=2, loader_batch=2)
    monkeypatch.setattr(stage, "_pending", real)
    assert mf.load(path).id == mf.load(clean).id

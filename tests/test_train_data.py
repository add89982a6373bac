"""The training data stream: shard split, views, corrupt samples, shard checks, exact resume of the order.

Also the shared helpers of the training tests: digits shards, and shards shaped like reshard's output
(image + ``cls`` + ``json`` soft targets) written through ``PartStore`` and a finalized dataset manifest.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline.errors import InputError
from pipeline.parts import PartResult, PartStore, fingerprint
from pipeline.tasks import failure_totals, file_entries, finalize, run_parts
from stages.ingest.stage import ingest
from stages.shardio import ShardStats, count_samples, read_shard, write_shard
from stages.train.augment import AugmentSpec, draw_view, view_rng
from stages.train.config import TrainConfig
from stages.train.data import DataPlan, check_shard_count, make_loader, shards_for, verify_shards
from stages.train.inputs import load_inputs, make_plan

NAMES = [str(d) for d in range(10)]


def digits(out: Path, split: str = "labeled=10/class,test=200,unlabeled=rest", shard_size: int = 50) -> dict:
    """Bundled digits split into labeled / test / unlabeled datasets; returns their manifest paths."""
    return ingest("digits", out, shard_size=shard_size, split=split, seed=0)


def write_dataset(out: Path, shards: list[list[dict]], soft_targets: dict | None = None) -> Path:
    """A labeled dataset manifest over the given samples (one list per shard), committed as parts."""
    store = PartStore(out, ".tar", fingerprint("train-test-factory", {"n": len(shards)}, "1"), count_samples)

    def produce(index: int) -> dict:
        def write(tmp: Path) -> PartResult:
            return PartResult(expected_rows=write_shard(tmp, iter(shards[index])), input={"shard": index})
        return store.commit(index, write)

    run_parts(store, range(len(shards)), produce)
    params = {"labeled": True, "class_names": NAMES, "num_classes": 10, "soft_targets": soft_targets,
              "source": "reshard" if soft_targets else "test", "split": None}
    build = lambda receipts: mf.build("dataset", stage="test", params=params, files=file_entries(receipts, "samples"),
                                      totals={"samples": sum(r["rows"] for r in receipts),
                                              "failures": failure_totals(receipts), "classes": 10})
    return finalize(store, len(shards), build)


def read_all(manifest_path) -> list[tuple[str, dict]]:
    manifest = mf.load(manifest_path)
    out = []
    for entry in manifest.files:
        out += list(read_shard(manifest.file_path(entry), ShardStats("x")))
    return out


def soft_shards(source_manifest, out: Path, num_shards: int, topk: int = 3, temperature: float = 2.0,
                seed: int = 0, corrupt: int = 0) -> Path:
    """Reshard-shaped shards of a labeled dataset: a made-up teacher (4 * one-hot(label) + noise) gives the
    top-K logits and lse at ``temperature``; the first ``corrupt`` samples get broken image bytes."""
    rng = np.random.default_rng(seed)
    shards: list[list[dict]] = [[] for _ in range(num_shards)]
    for i, (key, fields) in enumerate(read_all(source_manifest)):
        label = int(fields["cls"])
        z = rng.normal(size=10) + 4.0 * (np.arange(10) == label)
        order = np.argsort(-z)[:topk]
        lse = float(np.log(np.exp(z / temperature).sum()))
        body = {"score": 0.9, "source_key": key, "source_shard": 0, "dup": 0, "topk_index": order.tolist(),
                "topk_logit": z[order].tolist(), "lse": lse, "temperature": temperature}
        image = fields["png"][:40] if i < corrupt else fields["png"]
        shards[i % num_shards].append({"__key__": f"{key}__l{label}", "png": image, "cls": str(label).encode(),
                                       "json": json.dumps(body).encode()})
    return write_dataset(out, shards, {"topk": topk, "temperature": temperature, "teacher_id": "f" * 64,
                                       "logits_id": "e" * 64})


@pytest.fixture(scope="module")
def soft_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    made = digits(base / "digits", split="labeled=12/class,rest=rest", shard_size=60)
    return soft_shards(made["labeled"], base / "soft", num_shards=6, corrupt=2)


def _plan(manifest, **kw) -> DataPlan:
    config = TrainConfig(loss=kw.pop("loss", "mix"), batch_size=kw.pop("batch_size", 8), **kw)
    return make_plan(load_inputs([manifest], None, config), config, world=1)


def test_every_shard_goes_to_exactly_one_rank_and_stream_and_the_order_changes_by_epoch():
    for epoch in range(3):
        got = sorted(i for r in range(2) for s in range(3) for i in shards_for(13, 5, epoch, r, 2, s, 3))
        assert got == list(range(13))
    assert shards_for(13, 5, 0, 0, 1, 0, 1) != shards_for(13, 5, 1, 0, 1, 0, 1)


def test_fewer_shards_than_ranks_times_workers_is_refused_saying_what_to_change(soft_data):
    plan = _plan(soft_data, num_workers=4)
    plan = DataPlan(**{**plan.__dict__, "world": 2})
    with pytest.raises(InputError, match=r"6 training shard\(s\) for 2 rank\(s\) x 4 .*lower --num-workers"):
        check_shard_count(plan)


def test_less_than_one_batch_per_rank_is_refused_naming_the_batch_size(soft_data):
    plan = _plan(soft_data, num_workers=1)
    small = DataPlan(**{**plan.__dict__, "batch_size": plan.total_samples + 1})
    with pytest.raises(InputError, match=rf"{plan.total_samples} training samples make no full batch.*--batch-size"):
        check_shard_count(small)
    check_shard_count(DataPlan(**{**plan.__dict__, "batch_size": plan.total_samples}))


def test_views_depend_only_on_seed_epoch_and_key_and_stay_inside_the_image():
    spec = AugmentSpec(scale_min=0.3, flip_prob=0.5)
    a = draw_view(8, 8, view_rng(1, 2, "digits-00001"), spec)
    b = draw_view(8, 8, view_rng(1, 2, "digits-00001"), spec)
    c = draw_view(8, 8, view_rng(1, 3, "digits-00001"), spec)
    assert a == b and a != c
    boxes = [draw_view(8, 6, view_rng(0, 0, f"k{i}"), spec)[0] for i in range(200)]
    assert all(0 <= l < r <= 8 and 0 <= t < btm <= 6 for l, t, r, btm in boxes)
    assert {draw_view(8, 8, view_rng(0, 0, f"k{i}"), spec)[1] for i in range(50)} == {True, False}


def test_corrupt_samples_are_skipped_and_reported_with_their_keys(soft_data):
    broken = {key for key, fields in read_all(soft_data) if len(fields["png"]) == 40}
    plan = _plan(soft_data)
    batches = list(make_loader(plan, 0, 0, 0, [0]))
    failures = [f for b in batches for f in b["failures"]]
    assert len(broken) == 2 and {key for _, key in failures} == broken
    assert {reason for reason, _ in failures} == {"corrupt_image"}
    assert len(batches) == plan.steps_per_epoch == 120 // 8
    assert batches[0]["images"].shape == (8, 28, 28, 3) and batches[0]["topk_index"].shape == (8, 3)
    first_pass = [k for b in batches[:118 // 8] for k in b["keys"]]
    assert len(first_pass) == len(set(first_pass)) and not broken & set(first_pass)


def test_resumed_epoch_yields_exactly_the_remaining_batches_of_an_uninterrupted_one(soft_data):
    plan = _plan(soft_data, num_workers=2, shuffle_buffer=30)
    full = list(make_loader(plan, 1, 0, 0, [0, 0]))
    start = 5
    positions = [0, 0]
    for b, batch in enumerate(full[:start]):
        positions[b % 2] = batch["position"]
    rest = list(make_loader(plan, 1, 0, start, positions))
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[start:]]
    assert all(np.array_equal(x["images"], y["images"]) for x, y in zip(rest, full[start:]))


def test_a_damaged_shard_is_named_before_training(soft_data, tmp_path):
    plan = _plan(soft_data)
    copy = tmp_path / "part.tar"
    data = bytearray(Path(plan.shards[2].path).read_bytes())
    data[600] ^= 0xFF
    copy.write_bytes(bytes(data))
    damaged = list(plan.shards)
    damaged[2] = damaged[2].__class__(**{**damaged[2].__dict__, "path": str(copy)})
    assert verify_shards(list(plan.shards)) == []
    problems = verify_shards(damaged)
    assert len(problems) == 1 and "part.tar: sha256 differs" in problems[0]


def test_soft_loss_on_a_dataset_without_soft_targets_is_refused(tmp_path):
    made = digits(tmp_path, split="labeled=3/class,rest=rest")
    with pytest.raises(InputError, match="carries no soft targets.*--teacher-logits"):
        load_inputs([made["labeled"]], None, TrainConfig(loss="soft"))

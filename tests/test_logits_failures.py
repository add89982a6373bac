"""Bad input to the logits stage: corrupt samples, damaged shards, wrong cards, NaN logits, mixed reruns, verify."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import FingerprintMismatch, InputError, PartFailed
from pipeline.verify import verify
from stages import imaging
from stages.artifacts.cards import write_card
from stages.artifacts.checks import CHECKS
from stages.logits.stage import compute_logits
from stages.models.classifiers import build_model
from tests.test_logits_support import DIGITS_PP, NAMES, jpeg, make_dataset, relist, train_card

RNG = np.random.default_rng(7)
GOOD = [{"__key__": f"g{i:03d}", "jpg": jpeg(RNG)} for i in range(12)]


def _png16() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


PLANTED = {
    "bad-truncated": {"jpg": jpeg(RNG)[:300]},
    "bad-zero": {"jpg": b""},
    "bad-garbage": {"png": b"\x89PNG\r\n\x1a\n" + b"junk" * 50},
    "bad-noimage": {"txt": b"hello"},
    "ok-png16": {"png": _png16()},
}


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return train_card(tmp_path_factory.mktemp("card"), None, steps=0, seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards; shard 1 carries planted corrupt samples between good ones."""
    planted = [dict(__key__=k, **v) for k, v in PLANTED.items()]
    middle = GOOD[4:6] + planted[:3] + GOOD[6:8] + planted[3:]
    return make_dataset(tmp_path_factory.mktemp("data"), [GOOD[:4], middle, GOOD[8:]], NAMES)


def _receipt(out: Path, index: int) -> dict:
    return json.loads((out / "_parts" / f"part-{index:06d}.json").read_text())


def test_planted_corrupt_samples_commit_the_good_rows_and_name_the_bad_keys(card, shards, tmp_path):
    path = compute_logits(shards, card, tmp_path / "out", topk=3, temperature=1.0, num_workers=2, loader_batch=2)
    table = pq.read_table(tmp_path / "out" / "part-000001.parquet")
    assert table.column("key").to_pylist() == ["g004", "g005", "g006", "g007", "ok-png16"]
    receipt = _receipt(tmp_path / "out", 1)
    assert receipt["failures"] == {"corrupt_image": ["bad-garbage", "bad-truncated"], "empty_image": ["bad-zero"],
                                   "missing_image": ["bad-noimage"]}
    assert receipt["rows"] + receipt["failure_count"] == mf.load(shards).files[1]["samples"] == 9
    assert mf.load(path).totals["failures"] == {"corrupt_image": 2, "empty_image": 1, "missing_image": 1}


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_a_truncated_tar_fails_only_its_part_and_the_task_exits_1(card, shards, tmp_path, cut):
    data = tmp_path / "data"
    data.mkdir()
    for f in mf.load(shards).folder.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    tar = data / "part-000001.tar"
    body = tar.read_bytes()
    tar.write_bytes(body[:1500] if cut == "mid_member" else body[: 512 * 6])
    out = tmp_path / "out"
    with pytest.raises(PartFailed, match="part-000001"):
        compute_logits(data / "manifest.json", card, out, topk=3, temperature=1.0, num_workers=1)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000002.parquet"]
    failed = json.loads((out / "_parts" / "part-000001.failed.json").read_text())
    assert failed["reason"] in ("unreadable_tar", "checksum_mismatch") and "part-000001.tar" in failed["message"]
    assert not (out / "manifest.json").exists()
    assert main(["logits", "--data", str(data / "manifest.json"), "--teacher", str(card), "--topk", "3",
                 "--temperature", "1", "--out", str(out), "--num-workers", "0"]) == 1


def test_a_card_with_other_classes_is_refused_before_any_work(shards, tmp_path):
    other = train_card(tmp_path / "c7", None, steps=0, classes=[str(i) for i in range(7)])
    with pytest.raises(InputError, match="classes"):
        compute_logits(shards, other, tmp_path / "out", topk=3, temperature=1.0)
    renamed = train_card(tmp_path / "cn", None, steps=0, classes=[f"c{i}" for i in range(10)])
    with pytest.raises(InputError, match="classes"):
        compute_logits(shards, renamed, tmp_path / "out", topk=3, temperature=1.0)
    assert not (tmp_path / "out").exists()


def test_a_card_whose_preprocessing_disagrees_is_refused_before_any_work(card, tmp_path):
    wanted = imaging.Preprocess(size=32, crop_fraction=1.0).to_dict()
    data = make_dataset(tmp_path / "d", [GOOD[:2]], NAMES, {"preprocess": wanted})
    with pytest.raises(InputError, match="preprocess"):
        compute_logits(data, card, tmp_path / "out", topk=3, temperature=1.0)
    old = imaging.Preprocess(**{**DIGITS_PP.to_dict(), "mean": (0.5,) * 3, "std": (0.5,) * 3, "policy_version": 0})
    torch.manual_seed(0)
    stale = write_card(tmp_path / "old", build_model("smallcnn", 10), arch="smallcnn", class_names=NAMES,
                       preprocess=old, stage="test")
    with pytest.raises(InputError, match="policy_version"):
        compute_logits(make_dataset(tmp_path / "d2", [GOOD[:2]], NAMES), stale, tmp_path / "out", topk=3,
                       temperature=1.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("topk,temperature", [(0, 1.0), (11, 1.0), (3, 0.0), (3, float("nan"))])
def test_impossible_k_or_t_is_refused(card, shards, tmp_path, topk, temperature):
    with pytest.raises(InputError):
        compute_logits(shards, card, tmp_path / "out", topk=topk, temperature=temperature)


def test_nan_logits_are_counted_as_nonfinite_and_never_written(shards, tmp_path):
    torch.manual_seed(0)
    model = build_model("smallcnn", 10)
    with torch.no_grad():
        model.fc.weight[3, 0] = float("nan")  # class 3's logit is NaN for every image
    card = write_card(tmp_path / "nan", model, arch="smallcnn", class_names=NAMES, preprocess=DIGITS_PP,
                      stage="test")
    path = compute_logits(shards, card, tmp_path / "out", topk=3, temperature=1.0, num_workers=0)
    receipt = _receipt(tmp_path / "out", 0)
    assert receipt["rows"] == 0 and receipt["failures"] == {"nonfinite_logits": ["g000", "g001", "g002", "g003"]}
    assert mf.load(path).totals["rows"] == 0 and mf.load(path).totals["failures"]["nonfinite_logits"] == 13


def test_a_rerun_with_other_t_k_or_teacher_is_refused_by_fingerprint(card, shards, tmp_path):
    out = tmp_path / "out"
    compute_logits(shards, card, out, topk=3, temperature=1.0, num_workers=0, finalize=False)
    with pytest.raises(FingerprintMismatch, match="temperature"):
        compute_logits(shards, card, out, topk=3, temperature=2.0, num_workers=0)
    with pytest.raises(FingerprintMismatch, match="topk"):
        compute_logits(shards, card, out, topk=4, temperature=1.0, num_workers=0)
    other = train_card(tmp_path / "other", None, steps=0, seed=9)
    with pytest.raises(FingerprintMismatch, match="teacher_id"):
        compute_logits(shards, other, out, topk=3, temperature=1.0, num_workers=0)


def test_retry_failed_reattempts_only_failed_samples_and_gives_a_clean_runs_bytes(card, shards, tmp_path,
                                                                                   monkeypatch):
    real = imaging.centre_view

    def flaky(data, pp, max_pixels=imaging.DEFAULT_MAX_PIXELS):  # g001's decode fails once (transient)
        if data == GOOD[1]["jpg"]:
            raise imaging.SampleError("corrupt_image", "transient")
        return real(data, pp, max_pixels)

    monkeypatch.setattr(imaging, "centre_view", flaky)
    out = tmp_path / "out"
    compute_logits(shards, card, out, topk=3, temperature=1.0, num_workers=0, finalize=False)
    assert _receipt(out, 0)["failures"] == {"corrupt_image": ["g001"]}
    monkeypatch.setattr(imaging, "centre_view", real)
    kept = (out / "part-000001.parquet").stat().st_mtime_ns
    path = compute_logits(shards, card, out, topk=3, temperature=1.0, num_workers=0, retry_failed=True)
    assert _receipt(out, 0)["failures"] == {} and _receipt(out, 0)["rows"] == 4
    assert (out / "part-000001.parquet").stat().st_mtime_ns == kept  # its bad samples still fail: untouched
    clean = compute_logits(shards, card, tmp_path / "clean", topk=3, temperature=1.0, num_workers=0)
    assert mf.load(path).id == mf.load(clean).id


def _damaged(table: pa.Table, column: str, values) -> bytes:
    arrays = {name: table.column(name) for name in table.column_names}
    arrays[column] = values
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(arrays, schema=table.schema), sink)
    return sink.getvalue()


def test_verify_reports_damaged_logits_parts(card, shards, tmp_path):
    path = compute_logits(shards, card, tmp_path / "out", topk=3, temperature=1.0, num_workers=0)
    part = tmp_path / "out" / "part-000002.parquet"
    table = pq.read_table(part)
    n = table.num_rows
    idx = table.column("topk_index").combine_chunks()
    val = table.column("topk_logit").combine_chunks()
    flat_idx = idx.flatten().to_numpy().copy()
    flat_idx[1] = 10  # a class id outside [0, 10)
    flat_val = val.flatten().to_numpy().copy()
    flat_val[3:6] = flat_val[3:6][::-1].copy()  # row 1's logits ascending
    cases = {
        "cut footer": (part.read_bytes()[:-40], None, "not a readable Parquet"),
        "wrong rows": (part.read_bytes(), n + 1, "rows"),
        "duplicate keys": (_damaged(table, "key", pa.array(["g008"] * n)), None, "appears twice"),
        "index range": (_damaged(table, "topk_index", pa.FixedSizeListArray.from_arrays(
            pa.array(flat_idx, pa.int16()), 3)), None, "outside [0, 10)"),
        "unsorted": (_damaged(table, "topk_logit", pa.FixedSizeListArray.from_arrays(
            pa.array(flat_val, pa.float16()), 3)), None, "sorted"),
    }
    assert verify(path, CHECKS) == []
    for name, (body, rows, words) in cases.items():
        damaged = relist(path, 2, body, tmp_path / name.replace(" ", "_"), rows=rows)
        problems = verify(damaged, CHECKS)
        assert any(words in p and "part-000002.parquet" in p for p in problems), (name, problems)
        assert main(["verify", str(damaged)]) == 1

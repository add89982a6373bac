"""Select's two-pass map: numbers-only ranking (ScoreTopK), survivors' payload read back, exact tie-break by key."""

import functools
import os
import shutil
import threading

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import IntegrityError, KdpipeError
from stages.artifacts import logits_reader
from stages.artifacts.logits_reader import open_logits
from stages.artifacts.parquet import checksum
from stages.select.fetch import parallel_parts
from stages.select.stage import select
from stages.select.topk import ScoreBins, ScoreTopK, exact_rows
from tests.factories import make_logits, random_shards
from tests.test_select import T, brute_force, rounded, selected


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """5 shards x 120 images, 6 classes, integer logits (many equal scores), keys in no order within a part."""
    rng = np.random.default_rng(11)
    shards = [(list(rng.permutation(keys)), logits)
              for keys, logits in random_shards(rng, 5, 120, 6, prefix="x", ties=True)]
    return make_logits(tmp_path_factory.mktemp("shuffled") / "logits", shards, topk=4, temperature=T)


@pytest.mark.parametrize("cap", [None, 40])
def test_unordered_keys_and_a_tiny_first_pass_buffer_give_the_brute_force_rows(shuffled, tmp_path, monkeypatch,
                                                                                cap):
    if cap:  # compactions after every few batches: thresholds rise while ties at the boundary pile up
        monkeypatch.setattr("stages.select.stage.ScoreTopK", functools.partial(ScoreTopK, cap=cap))
    select(shuffled, tmp_path / "sel", per_class=37, top_p=3, batch_rows=50, gallery=0)
    assert selected(tmp_path / "sel") == rounded(brute_force(shuffled, 37, 3))


def test_score_topk_keeps_the_exact_rows_and_their_ties_and_exact_rows_breaks_them_by_key():
    rng = np.random.default_rng(4)
    n, classes = 6000, 5
    labels = rng.integers(0, classes, n).astype(np.int32)
    scores = (rng.integers(0, 7, n) / 8).astype(np.float32)
    keys = np.array([f"k{v:07d}" for v in rng.permutation(10**6)[:n]])
    quotas = rng.integers(0, 80, classes)
    bound = ScoreTopK(quotas, cap=64)
    for start in range(0, n, 41):
        sl = slice(start, start + 41)
        bound.add(labels[sl], scores[sl], np.arange(start, min(start + 41, n), dtype=np.int64))
    assert bound.compactions >= 5
    got_labels, got_scores, ids = bound.result()
    assert (np.diff(ids) > 0).all()
    full = sorted(zip(labels.tolist(), (-scores).tolist(), keys.tolist()))
    want, seen = [], {}
    for label, neg, key in full:
        if seen.get(label, 0) < quotas[label]:
            want.append({"key": key, "label": label, "score": float(-neg)})
            seen[label] = seen.get(label, 0) + 1
    assert {r["key"] for r in want} <= set(keys[ids].tolist())
    table = exact_rows(got_labels, got_scores, pa.table({"key": keys[ids]}), quotas)
    assert table.to_pylist() == want


def test_the_part_readers_yield_every_item_and_raise_where_a_producer_failed():
    def produce(part):
        yield from (part * 10 + i for i in range(3))
        if part == 3:
            raise IntegrityError(f"part-{part:06d}.parquet: damaged")

    assert sorted(parallel_parts(range(3), produce)) == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    with pytest.raises(IntegrityError, match="part-000003.parquet: damaged"):
        list(parallel_parts(range(6), produce))
    assert not [t for t in threading.enumerate() if t.name.startswith("select-read")]  # the workers were joined


def test_a_key_twice_in_an_unordered_part_is_refused_naming_the_part_and_the_key(tmp_path):
    logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    manifest = make_logits(tmp_path / "l", [(["b", "a", "c", "a"], logits)], topk=3)
    with pytest.raises(KdpipeError, match="part-000000.parquet: key .a. appears more than once"):
        select(manifest, tmp_path / "s", per_class=2, top_p=1, gallery=0)


def test_score_bins_thresholds_never_exceed_the_kth_score_and_stay_within_a_bin_of_it():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 5000)
    scores = np.concatenate([rng.random(4000), np.full(990, 1.0), rng.random(10) * 1e-7]).astype(np.float32)
    quotas = np.array([50, 0, 1200, 5000])
    bins = ScoreBins(4)
    bins.add(labels, scores)
    thr = bins.thresholds(quotas)
    for label, quota in enumerate(quotas):
        ranked = np.sort(scores[labels == label])[::-1]
        if quota == 0 or quota > len(ranked):
            assert thr[label] == -np.inf  # nothing to bound: the class is not full (or takes nothing)
            continue
        kth = ranked[quota - 1]
        assert thr[label] <= kth and (scores[labels == label] >= thr[label]).sum() >= quota
        assert thr[label] >= kth / (1 + 1 / 16) or kth < 2 ** -20  # at most one bin (1/16 of an octave) below



def test_a_part_is_hashed_once_per_file_and_again_once_replaced(shuffled, tmp_path, monkeypatch):
    """Select's two passes open each part twice: one sha256; a part replaced or rewritten since is hashed and refused."""
    hashed = []
    monkeypatch.setattr(logits_reader, "checksum", lambda path: hashed.append(path) or checksum(path))
    folder = tmp_path / "copy"
    shutil.copytree(shuffled.parent, folder)
    logits = open_logits(folder)
    logits.open_part(1)
    logits.open_part(1)
    assert len(hashed) == 1
    part = logits.part_path(1)
    body = bytearray(part.read_bytes())
    body[len(body) // 2] ^= 1
    replacement = part.with_suffix(".new")
    replacement.write_bytes(bytes(body))
    os.replace(replacement, part)  # a new file, same size
    with pytest.raises(IntegrityError, match="part-000001.parquet: size or sha256 differs"):
        logits.open_part(1)
    assert len(hashed) == 2

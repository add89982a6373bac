"""Reruns of the real logits -> select -> reshard chain.

Expected:
- a rerun of a completed stage does no work (the model, the map/reduce writers and the tar writer are never
  called) and changes no file: every file in the folder keeps its sha256 AND its mtime (receipts, manifest,
  select report included);
- a rerun into the same folder with another teacher, K, T or resize policy (logits), another per-class K or
  policy (select), another seed or shard size (reshard) is refused (``FingerprintMismatch``, naming the changed
  parameter) and the folder is left untouched (sha256 and mtime of every file);
- another read batch or number of tasks gives byte-identical parts (select ``batch_rows``/``num_tasks``, reshard
  ``max_rows``/``num_tasks``; the logits equivalents are in test_logits.py).
"""

from __future__ import annotations

import pytest

from pipeline import manifest as mf
from pipeline.errors import FingerprintMismatch
from stages import imaging
from tests.test_logits_support import DIGITS_PP, train_card
from tests.test_reliability_kill import part_files
from tests.test_reliability_support import RUNS, clean_chain, snapshot


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory)


def _forbid(monkeypatch, target: str, name: str) -> None:
    def fail(*_, **__):
        raise AssertionError(f"a rerun of a complete stage called {target}.{name}")
    monkeypatch.setattr(f"{target}.{name}", fail)


@pytest.mark.parametrize("stage", list(RUNS))
def test_rerun_of_a_complete_stage_does_no_work_and_changes_no_file(chain, stage, monkeypatch):
    folder = getattr(chain, stage)
    before = snapshot(folder)
    _forbid(monkeypatch, "stages.logits.stage", "_engine")
    _forbid(monkeypatch, "stages.select.stage", "map_block")
    _forbid(monkeypatch, "stages.select.stage", "_reduce_write")
    _forbid(monkeypatch, "stages.reshard.stage", "write_shard")
    result = RUNS[stage](chain, folder)
    manifest = getattr(result, "manifest", result)
    assert mf.load(manifest).id == mf.load(folder).id
    assert snapshot(folder) == before


def _refused_untouched(run, folder, error, match: str) -> None:
    before = snapshot(folder)
    with pytest.raises(error, match=match):
        run()
    assert snapshot(folder) == before


@pytest.mark.parametrize("change, error, match", [
    ({"temperature": 3.0}, FingerprintMismatch, "temperature"),
    ({"topk": 4}, FingerprintMismatch, "topk"),
    ("teacher", FingerprintMismatch, "teacher_id"),
    ("resize", FingerprintMismatch, "preprocess"),
])
def test_logits_rerun_with_other_teacher_k_t_or_resize_policy_is_refused(chain, tmp_path, change, error, match):
    options = change if isinstance(change, dict) else {}
    card = chain.card
    if change == "teacher":
        card = train_card(tmp_path / "other", None, steps=0, seed=7)
    elif change == "resize":
        pp = imaging.Preprocess(**{**DIGITS_PP.to_dict(), "mean": DIGITS_PP.mean, "std": DIGITS_PP.std,
                                   "interpolation": "bicubic"})
        card = train_card(tmp_path / "bicubic", None, steps=0, pp=pp)
    chain_with_card = type(chain)(chain.data, card, chain.logits, chain.select, chain.reshard)
    _refused_untouched(lambda: RUNS["logits"](chain_with_card, chain.logits, **options), chain.logits, error, match)


@pytest.mark.parametrize("stage, options, match", [
    ("select", {"per_class": 4}, "per_class"),
    ("select", {"policy": "threshold", "min_score": 0.5}, "policy"),
    ("reshard", {"seed": 1}, "seed"),
    ("reshard", {"shard_size": 6}, "shard_size"),
])
def test_select_and_reshard_reruns_with_other_parameters_are_refused(chain, stage, options, match):
    folder = getattr(chain, stage)
    _refused_untouched(lambda: RUNS[stage](chain, folder, **options), folder, FingerprintMismatch, match)


def test_other_read_batches_and_task_counts_give_byte_identical_parts(chain, tmp_path):
    out = tmp_path / "select"
    for task in range(2):
        RUNS["select"](chain, out, batch_rows=7, num_tasks=2, task_index=task)
    assert part_files(out)["part-000000.parquet"] == part_files(chain.select)["part-000000.parquet"]
    assert mf.load(out).id == mf.load(chain.select).id
    out = tmp_path / "reshard"
    for task in range(2):
        RUNS["reshard"](chain, out, max_rows=3, num_tasks=2, task_index=task)
    assert part_files(out) == part_files(chain.reshard) and mf.load(out).id == mf.load(chain.reshard).id

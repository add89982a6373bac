"""Tampering and integrity across stages, on a copy of the real digits chain.

Expected:
- a shard or part whose bytes (hence sha256) differ from its manifest is refused by EVERY stage that reads it,
  with an error naming the file: logits (a dataset shard: that part fails, ``checksum_mismatch``, the other parts
  commit), select (a logits part), reshard (a selection part; a dataset shard fails its output part), dedup
  (a logits part), evaluate (a dataset shard; teacher logits), train (a training shard);
- ``kdpipe verify`` on an artifact with a changed, a cut and a missing part lists all three and exits 1;
- a logits part listed with a MATCHING sha256 but written wrong (duplicate keys, class ids outside [0, C),
  top-K logits not sorted) is rejected by ``kdpipe verify`` (exit 1, naming the part) and by every reader:
  ``LogitsSet.read_part`` / ``iter_batches`` (used by select, dedup, reshard, evaluate, train) raise
  ``IntegrityError`` naming the part, and select / dedup / evaluate fail without publishing an artifact.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import IntegrityError, KdpipeError, PartFailed
from pipeline.verify import verify
from stages.artifacts.checks import CHECKS
from stages.artifacts.logits_reader import open_logits
from stages.dedup.stage import dedup
from stages.evaluate.stage import evaluate
from stages.logits.stage import compute_logits
from stages.reshard.stage import reshard
from stages.select.stage import select
from stages.train.config import TrainConfig
from stages.train.loop import train
from tests.test_logits_support import relist
from tests.test_reliability_support import clean_chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return clean_chain(tmp_path_factory)


@pytest.fixture
def copy(chain, tmp_path) -> Path:
    """A private copy of the chain's folders (relative lineage paths keep working)."""
    root = Path(chain.logits).parent
    shutil.copytree(root, tmp_path / "c")
    return tmp_path / "c"


def flip(path: Path) -> Path:
    """Change one byte of ``path`` (same size, other sha256): in a tar, inside a member's data (its headers and
    their checksums stay valid, so only the sha256 can tell); elsewhere in the middle of the file."""
    body = bytearray(path.read_bytes())
    offset = len(body) // 2
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            offset = tar.getmembers()[1].offset_data
    body[offset] ^= 0xFF
    path.write_bytes(bytes(body))
    return path


def _data(copy: Path) -> Path:
    return copy / "data" / "sub" / "manifest.json"


def _card(copy: Path) -> Path:
    return copy / "teacher"


def test_logits_refuses_a_changed_dataset_shard_and_commits_the_others(copy, tmp_path):
    shard = flip(copy / "data" / "sub" / "part-000001.tar")
    with pytest.raises(PartFailed, match="part-000001"):
        compute_logits(_data(copy), _card(copy), tmp_path / "out", topk=3, temperature=2.0, num_workers=0)
    record = json.loads((tmp_path / "out" / "_parts" / "part-000001.failed.json").read_text())
    assert record["reason"] == "checksum_mismatch" and shard.name in record["message"]
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == [
        "part-000000.parquet", "part-000002.parquet", "part-000003.parquet"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_select_refuses_a_changed_logits_part(copy, tmp_path):
    part = flip(copy / "logits" / "part-000002.parquet")
    with pytest.raises(KdpipeError, match=f"{part}: size or sha256 differs"):
        select(copy / "logits", tmp_path / "out", per_class=5, top_p=2)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_reshard_refuses_a_changed_selection_part_and_a_changed_source_shard(copy, tmp_path):
    part = flip(copy / "select" / "part-000000.parquet")
    with pytest.raises(IntegrityError, match=f"{part}: size or sha256 differs"):
        reshard(copy / "select", tmp_path / "a", shard_size=5)
    flip(part)  # restored
    shard = flip(copy / "data" / "sub" / "part-000000.tar")
    result = reshard(copy / "select", tmp_path / "b", shard_size=5)
    assert result.manifest is None and result.report.failed
    assert all(shard.name in message for message in result.report.failed.values())


def test_dedup_and_evaluate_refuse_changed_logits_parts(copy, tmp_path):
    emb = compute_logits(_data(copy), _card(copy), tmp_path / "emb", topk=3, temperature=2.0, num_workers=0,
                         embeddings=True)
    part = flip(tmp_path / "emb" / "part-000003.parquet")
    with pytest.raises(KdpipeError, match=f"{part}: size or sha256 differs"):
        dedup(emb, tmp_path / "dedup")
    part = flip(copy / "logits" / "part-000000.parquet")
    with pytest.raises(IntegrityError, match=f"{part}: size or sha256 differs"):
        evaluate(_card(copy), _data(copy), tmp_path / "eval", teacher_logits=copy / "logits", num_workers=0)


def test_evaluate_refuses_a_changed_dataset_shard(copy, tmp_path):
    shard = flip(copy / "data" / "sub" / "part-000003.tar")
    with pytest.raises(KdpipeError, match="part-000003"):
        evaluate(_card(copy), _data(copy), tmp_path / "eval", num_workers=0)
    assert not (tmp_path / "eval" / "manifest.json").exists() and shard.exists()


def test_train_refuses_a_changed_training_shard(copy, tmp_path):
    shard = flip(copy / "reshard" / "part-000001.tar")
    config = TrainConfig(epochs=1, batch_size=4, num_workers=0, threads=1, shuffle_buffer=4)
    with pytest.raises(KdpipeError, match=str(shard)):
        train([copy / "reshard"], tmp_path / "train", config)
    assert not (tmp_path / "train" / "manifest.json").exists()


# --- parts written wrong, listed with a matching sha256 -------------------------------------------------------

def _rewrite(table: pa.Table, column: str, values: pa.Array) -> bytes:
    arrays = {name: table.column(name) for name in table.column_names}
    arrays[column] = values
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(arrays, schema=table.schema), sink)
    return sink.getvalue()


def _fixed(values: np.ndarray, like: pa.ChunkedArray, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values, like.type.value_type), width)


def wrong_parts(part: Path, topk: int) -> dict[str, tuple[bytes, str]]:
    """Damaged copies of a logits part: (bytes, words of the expected error)."""
    table = pq.read_table(part)
    keys = table.column("key").to_pylist()
    index = table.column("topk_index").combine_chunks().flatten().to_numpy().copy()
    logit = table.column("topk_logit").combine_chunks().flatten().to_numpy().copy()
    index[topk] = 10  # row 1: a class id outside [0, 10)
    logit[:topk] = logit[:topk][::-1].copy()  # row 0: ascending
    return {
        "duplicate_keys": (_rewrite(table, "key", pa.array([keys[0]] + keys[:-1])), "appears"),
        "index_range": (_rewrite(table, "topk_index", _fixed(index, table.column("topk_index"), topk)),
                        r"outside \[0, 10\)"),
        "unsorted": (_rewrite(table, "topk_logit", _fixed(logit, table.column("topk_logit"), topk)), "sorted"),
    }


@pytest.mark.parametrize("damage", ["duplicate_keys", "index_range", "unsorted"])
def test_a_logits_part_written_wrong_is_rejected_by_verify_and_by_every_reader(chain, tmp_path, damage):
    body, words = wrong_parts(Path(chain.logits) / "part-000001.parquet", 3)[damage]
    bad = relist(Path(chain.logits) / "manifest.json", 1, body, tmp_path / "bad")
    assert any("part-000001.parquet" in p for p in verify(bad, CHECKS))
    assert main(["verify", str(bad)]) == 1
    logits = open_logits(bad)
    with pytest.raises(IntegrityError, match=words):
        logits.read_part(1, columns=["key", "lse"])
    with pytest.raises(IntegrityError, match=words):
        list(logits.iter_batches(columns=["key"], batch_rows=7))
    logits.read_part(0)  # the intact parts stay readable
    with pytest.raises(KdpipeError, match=words):
        select(bad, tmp_path / "sel", per_class=5, top_p=2)
    with pytest.raises(KdpipeError, match=words):
        evaluate(chain.card, chain.data, tmp_path / "eval", teacher_logits=bad, num_workers=0)
    assert not (tmp_path / "sel" / "manifest.json").exists() and not (tmp_path / "eval" / "manifest.json").exists()


def test_dedup_rejects_a_logits_part_with_duplicate_keys(chain, tmp_path):
    emb = compute_logits(chain.data, chain.card, tmp_path / "emb", topk=3, temperature=2.0, num_workers=0,
                         embeddings=True)
    body, words = wrong_parts(tmp_path / "emb" / "part-000002.parquet", 3)["duplicate_keys"]
    bad = relist(emb, 2, body, tmp_path / "bad")
    with pytest.raises(KdpipeError, match="part-000002.parquet: key .* appears more than once"):
        dedup(bad, tmp_path / "dedup")
    assert not (tmp_path / "dedup" / "manifest.json").exists()


def test_verify_lists_every_damaged_file_and_exits_non_zero(copy, capsys):
    flip(copy / "logits" / "part-000000.parquet")
    cut = copy / "logits" / "part-000002.parquet"
    cut.write_bytes(cut.read_bytes()[:-40])
    (copy / "logits" / "part-000003.parquet").unlink()
    problems = verify(copy / "logits" / "manifest.json", CHECKS)
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in problems] == [
        "part-000000.parquet", "part-000002.parquet", "part-000003.parquet"], problems
    assert main(["verify", str(copy / "logits")]) == 1
    out = capsys.readouterr()
    assert all(f"part-00000{i}.parquet" in out.out + out.err for i in (0, 2, 3))

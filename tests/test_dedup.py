"""Dedup: planted near-duplicates and a planted contaminated image are found, nothing else; exclusion feeds select."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import InputError
from stages.dedup.stage import dedup
from stages.select.stage import select
from tests.factories import make_logits, random_shards

DIM = 32


def _unit(rng, n):
    x = rng.normal(size=(n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _near(rng, v, noise=0.02):
    x = v + noise * rng.normal(size=v.shape) / np.sqrt(DIM)
    return x / np.linalg.norm(x)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Pool of 2 x 150 images with a group of 3 near-identical ones (across shards), a pair, and one
    image that is a near-copy of a reference (evaluation) image."""
    out = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(7)
    ref_emb = _unit(rng, 40)
    pool = _unit(rng, 300)
    pool[5] = _near(rng, ref_emb[3])            # img-000-00005 leaks evaluation image ref-000-00003
    pool[[20, 170, 60]] = [_near(rng, pool[60]) for _ in range(3)]  # group: 20, 60 (shard 0), 170 (shard 1)
    pool[90] = _near(rng, pool[91])             # pair 90, 91
    shards = random_shards(rng, 2, 150, 5)
    query = make_logits(out / "pool", shards, topk=3, embeddings=[pool[:150], pool[150:]])
    ref = make_logits(out / "ref", random_shards(rng, 1, 40, 5, prefix="ref"), topk=3, embeddings=[ref_emb])
    return out, query, ref


def test_planted_duplicates_and_contamination_are_found_and_nothing_else(planted):
    out, query, ref = planted
    manifest = dedup(query, out / "ex", reference=ref, threshold=0.95, batch_rows=64)
    rows = pq.read_table(out / "ex/part-000000.parquet").to_pylist()
    found = [(r["key"], r["reason"], r["matched_key"]) for r in rows]
    assert found == [("img-000-00005", "contaminated", "ref-000-00003"),
                     ("img-000-00060", "near_duplicate", "img-000-00020"),
                     ("img-000-00091", "near_duplicate", "img-000-00090"),
                     ("img-001-00020", "near_duplicate", "img-000-00020")]
    assert all(r["similarity"] >= 0.95 for r in rows)
    loaded = mf.load(manifest, kind="exclusion")
    assert loaded.totals["contaminated"] == 1 and loaded.totals["near_duplicate"] == 3
    assert [i["role"] for i in loaded.inputs] == ["query", "reference"]


def test_without_reference_only_near_duplicates_and_select_drops_them(planted, tmp_path):
    out, query, _ = planted
    assert main(["dedup", "--query", str(query), "--out", str(tmp_path / "ex"), "--threshold", "0.95"]) == 0
    keys = pq.read_table(tmp_path / "ex/part-000000.parquet").column("key").to_pylist()
    assert keys == ["img-000-00060", "img-000-00091", "img-001-00020"]
    assert main(["verify", str(tmp_path / "ex/manifest.json")]) == 0
    select(query, tmp_path / "sel", per_class=1000, top_p=3, exclude=tmp_path / "ex", gallery=0)
    chosen = set(pq.read_table(tmp_path / "sel/part-000000.parquet").column("key").to_pylist())
    assert not chosen & set(keys) and "img-000-00020" in chosen and len(chosen) == 297


def test_logits_without_embeddings_are_refused(tmp_path):
    plain = make_logits(tmp_path / "l", random_shards(np.random.default_rng(0), 1, 10, 3), topk=2)
    with pytest.raises(InputError, match="has no embedding column"):
        dedup(plain, tmp_path / "ex")


def test_verify_check_of_exclusion_parts(planted, tmp_path):
    from stages.artifacts.exclusion import check_exclusion_part

    out, query, ref = planted
    manifest = mf.load(dedup(query, tmp_path / "ex", reference=ref), kind="exclusion")
    part = tmp_path / "ex/part-000000.parquet"
    assert check_exclusion_part(manifest, manifest.files[0], part) == []
    table = pq.read_table(part)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), tmp_path / "twice.parquet")
    assert any("excluded twice" in p for p in check_exclusion_part(manifest, {}, tmp_path / "twice.parquet"))


def test_components_of_chains_and_pairs():
    from stages.dedup.stage import components

    rows, cols = np.array([5, 3, 1, 8]), np.array([4, 4, 5, 9])   # 1-5-4-3 chain, 8-9 pair
    assert components(10, rows, cols).tolist() == [0, 1, 2, 1, 1, 1, 6, 7, 8, 8]

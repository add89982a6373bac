"""Sharded IVF dedup (``--method ivf``): the planted groups and contamination are found, as the flat method finds
them; its pairs are a subset of the exact ones; 3 tasks give the bytes of 1; a SIGKILL in any step and a rerun
give the clean artifact; ``kdpipe run`` chains the steps from a config and ``select --exclude`` takes the result."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.cli.run import run_pipeline
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.signals import FAULT_ENV
from stages.artifacts.logits_reader import open_logits
from stages.dedup.core import load_embeddings
from stages.dedup.ivf import dedup_ivf
from stages.dedup.stage import dedup, near_pairs
from stages.select.stage import select
from tests.factories import make_logits, random_shards
from tests.test_dedup import _near, _unit
from tests.test_faults import _fork
from tests.test_reliability_kill import _mid_parquet, assert_folder_sound, part_files

ROWS = 200
IVF = {"lists": 8, "probe": 3, "train_sample": 600, "list_block": 3}   # 3 logits parts, 3 search parts
KEY = "img-{:03d}-{:05d}"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3 parts x 200 images: a group of 3 across parts, two pairs (one across parts), two images that leak
    reference images, and a group whose smallest key is contaminated (so the other member is kept)."""
    out = tmp_path_factory.mktemp("ivf")
    rng = np.random.default_rng(11)
    ref = _unit(rng, 50)
    pool = _unit(rng, 3 * ROWS)
    at = lambda part, row: part * ROWS + row
    for part, row in [(1, 20), (2, 30)]:
        pool[at(part, row)] = _near(rng, pool[at(0, 10)])
    pool[at(0, 51)] = _near(rng, pool[at(0, 50)])
    pool[at(2, 71)] = _near(rng, pool[at(1, 70)])
    pool[at(1, 5)], pool[at(2, 6)] = _near(rng, ref[3]), _near(rng, ref[7])
    side = _unit(rng, 1)[0] - ref[9] @ _unit(rng, 1)[0] * ref[9]
    side -= (side @ ref[9]) * ref[9]
    side /= np.linalg.norm(side)
    angle = np.arccos(0.97)   # 0.97 to ref 9, and to the next image, which is only cos(2 angle) = 0.88 to ref 9
    pool[at(0, 100)] = np.cos(angle) * ref[9] + np.sin(angle) * side
    pool[at(2, 100)] = np.cos(2 * angle) * ref[9] + np.sin(2 * angle) * side
    shards = random_shards(rng, 3, ROWS, 5)
    query = make_logits(out / "pool", shards, topk=3, embeddings=[pool[i * ROWS:(i + 1) * ROWS] for i in range(3)])
    reference = make_logits(out / "ref", random_shards(rng, 1, 50, 5, prefix="ref"), topk=3, embeddings=[ref])
    clean = dedup_ivf(query, out / "clean", reference=reference, **IVF)
    return out, query, reference, clean


EXPECTED = [(KEY.format(0, 51), "near_duplicate", KEY.format(0, 50)),
            (KEY.format(0, 100), "contaminated", "ref-000-00009"),
            (KEY.format(1, 5), "contaminated", "ref-000-00003"),
            (KEY.format(1, 20), "near_duplicate", KEY.format(0, 10)),
            (KEY.format(2, 6), "contaminated", "ref-000-00007"),
            (KEY.format(2, 30), "near_duplicate", KEY.format(0, 10)),
            (KEY.format(2, 71), "near_duplicate", KEY.format(1, 70))]


def _rows(folder: Path) -> list[tuple]:
    return [(r["key"], r["reason"], r["matched_key"]) for r in pq.read_table(folder / "part-000000.parquet").to_pylist()]


def _pairs(folder: Path) -> set[frozenset]:
    found = set()
    for part in sorted((folder / "_ivf/search").glob("part-*.parquet")):
        table = pq.read_table(part, columns=["key_a", "key_b"])
        found |= {frozenset(p) for p in zip(table.column("key_a").to_pylist(), table.column("key_b").to_pylist())}
    return found


def test_sharded_path_finds_the_planted_groups_and_contamination_as_the_flat_path(planted, tmp_path):
    out, query, reference, clean = planted
    assert _rows(out / "clean") == EXPECTED   # img-002-00100 is kept: its group's smaller key is contaminated
    flat = dedup(query, tmp_path / "flat", reference=reference)
    assert _rows(tmp_path / "flat") == EXPECTED
    np.testing.assert_allclose(pq.read_table(out / "clean/part-000000.parquet").column("similarity").to_numpy(),
                               pq.read_table(tmp_path / "flat/part-000000.parquet").column("similarity").to_numpy(),
                               atol=1e-6)
    manifest, exact = mf.load(clean, kind="exclusion"), mf.load(flat, kind="exclusion")
    assert manifest.params["method"] == "ivf" and manifest.params["lists"] == 8 and manifest.params["probe"] == 3
    assert manifest.totals == {**exact.totals} == {"rows": 7, "samples": 600, "contaminated": 3, "near_duplicate": 4}
    assert main(["verify", str(clean)]) == 0 and main(["verify", str(out / "clean/_ivf/search")]) == 0


def test_sharded_pairs_are_a_subset_of_the_exact_pairs_and_hold_every_planted_pair(planted):
    out, query, _, _ = planted
    keys, matrix = load_embeddings(open_logits(query), 64)
    rows, cols, _ = near_pairs(matrix, 0.95, 32, 64)
    names = keys.to_pylist()
    exact = {frozenset((names[r], names[c])) for r, c in zip(rows, cols)}
    found = _pairs(out / "clean")
    planted_pairs = {frozenset((KEY.format(0, 10), KEY.format(1, 20))), frozenset((KEY.format(0, 50), KEY.format(0, 51))),
                     frozenset((KEY.format(1, 70), KEY.format(2, 71))), frozenset((KEY.format(0, 100), KEY.format(2, 100)))}
    assert planted_pairs <= found <= exact


def test_three_tasks_per_step_give_the_bytes_of_one(planted, tmp_path):
    out, query, reference, clean = planted
    for step in ("train", "assign", "search", "group"):
        for task in (2, 0, 1):   # any order; the last task to finish writes the step's manifest
            dedup_ivf(query, tmp_path / "t3", reference=reference, step=step, task_index=task, num_tasks=3, **IVF)
    assert part_files(tmp_path / "t3") == part_files(out / "clean")
    for sub in ("_ivf/train", "_ivf/assign", "_ivf/search", "."):
        assert mf.load(tmp_path / "t3" / sub).id == mf.load(out / "clean" / sub).id


@pytest.mark.parametrize("setting, assign_parts", [({"assign_block": 2}, 2), ({"quantizer": "hnsw"}, 3)],
                         ids=["assign_block", "hnsw"])
def test_assign_blocks_and_the_hnsw_quantizer_give_the_same_pairs_and_exclusion(planted, setting, assign_parts,
                                                                                 tmp_path):
    out, query, reference, _ = planted
    manifest = dedup_ivf(query, tmp_path / "b", reference=reference, **IVF, **setting)
    assert _rows(tmp_path / "b") == EXPECTED and _pairs(tmp_path / "b") == _pairs(out / "clean")
    assert len(mf.load(tmp_path / "b/_ivf/assign").files) == assign_parts
    assert all(mf.load(manifest).params[k] == v for k, v in setting.items())


# part.begin / part.published arrivals in `--step all`: train 1, assign 3, search 3, group 1; pq.write_table calls:
# train 1, search 3, group 1 (assign parts are written by a ParquetWriter, one row group per search part)
KILLS = [("train", "part.published:1"), ("assign", "part.begin:3"), ("assign", "part.published:3"),
         ("search", "part.published:6"), ("group", "part.published:8"), ("search", "mid_part_write:3"),
         ("group", "mid_part_write:5")]


@pytest.mark.parametrize("step, point", KILLS, ids=[f"{s}-{p.split(':')[0]}" for s, p in KILLS])
def test_sigkill_in_a_step_then_rerun_gives_the_clean_exclusion(planted, step, point, tmp_path):
    out, query, reference, clean = planted
    run = lambda: dedup_ivf(query, tmp_path / "x", reference=reference, **IVF)

    def killed():
        if point.startswith("mid_part_write"):
            _mid_parquet(int(point.split(":")[1]))   # the Nth Parquet write is cut half-way by SIGKILL
        run()
    env = {} if point.startswith("mid_part_write") else {FAULT_ENV: point}
    assert _fork(killed, env) == -signal.SIGKILL
    folders = {"train": "_ivf/train", "assign": "_ivf/assign", "search": "_ivf/search", "group": "."}
    done = [(tmp_path / "x" / folders[s] / "manifest.json").exists() for s in folders]
    assert done == [s != step and list(folders).index(s) < list(folders).index(step) for s in folders]  # killed in it
    assert _fork(run, {}) == 0
    assert part_files(tmp_path / "x") == part_files(out / "clean")
    assert mf.load(tmp_path / "x").id == mf.load(clean).id
    assert_folder_sound(tmp_path / "x")


def test_kdpipe_run_chains_the_steps_from_a_config_and_select_takes_the_exclusion(planted, tmp_path):
    out, query, _, clean = planted
    args = {"query": str(query), "method": "ivf", "threshold": 0.95, **IVF}
    stage = lambda step, **more: {"command": "dedup", "args": {**args, "step": step}, "out": "dd", **more}
    stages = {"dd_train": stage("train", outputs=["_ivf/train"]),
              "dd_assign": stage("assign", outputs=["_ivf/assign"], mode="array", array=3, needs=["dd_train"]),
              "dd_search": stage("search", outputs=["_ivf/search"], mode="array", array=2, needs=["dd_assign"]),
              "dd_group": stage("group", needs=["dd_search"])}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": stages}, sort_keys=False))
    outcomes = run_pipeline(load_config(path))
    assert [o.status for o in outcomes] == ["done"] * 4
    assert [o.status for o in run_pipeline(load_config(path))] == ["skipped"] * 4
    direct = dedup_ivf(query, tmp_path / "direct", **IVF)
    assert mf.load(tmp_path / "run/dd").id == mf.load(direct).id
    select(query, tmp_path / "sel", per_class=1000, top_p=3, exclude=tmp_path / "run/dd", gallery=0)
    chosen = set(pq.read_table(tmp_path / "sel/part-000000.parquet").column("key").to_pylist())
    dropped = {k for k, _, _ in _rows(tmp_path / "run/dd")}
    assert len(dropped) == 5 and not chosen & dropped and len(chosen) == 595


def test_steps_out_of_order_and_bad_settings_are_named_errors(planted, tmp_path):
    _, query, _, _ = planted
    with pytest.raises(InputError, match=r"_ivf/train/manifest.json: no manifest yet; run .*--step train"):
        dedup_ivf(query, tmp_path / "o", step="search", **IVF)
    with pytest.raises(InputError, match="--step all runs every step in one task"):
        dedup_ivf(query, tmp_path / "o", num_tasks=3, **IVF)
    dedup_ivf(query, tmp_path / "o", step="train", **IVF)
    with pytest.raises(InputError, match=r"_ivf/assign/manifest.json: no manifest yet; run .*--step assign"):
        dedup_ivf(query, tmp_path / "o", step="search", **IVF)
    with pytest.raises(InputError, match=r"_ivf/train/manifest.json: made with lists=8, this step was given 16"):
        dedup_ivf(query, tmp_path / "o", step="assign", **{**IVF, "lists": 16})
    with pytest.raises(InputError, match="--probe 9: at most --lists"):
        dedup_ivf(query, tmp_path / "o", **{**IVF, "probe": 9})
    assert main(["dedup", "--query", str(query), "--out", str(tmp_path / "o"), "--method", "ivf", "--lists", "2000",
                 "--train-sample", "4000"]) == 2
    assert main(["dedup", "--query", str(query), "--out", str(tmp_path / "f"), "--step", "train"]) == 2


@pytest.mark.gpu
def test_on_gpu_the_same_exclusion_as_on_cpu(planted, tmp_path):
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU (faiss-gpu not installed or no device)")
    out, query, reference, _ = planted
    dedup_ivf(query, tmp_path / "gpu", reference=reference, **IVF)
    assert _rows(tmp_path / "gpu") == EXPECTED and _pairs(tmp_path / "gpu") == _pairs(out / "clean")


def test_the_bundled_ivf_config_submits_four_chained_steps(tmp_path):
    from pipeline.cli.submit import submit
    from tests.slurm_helpers import REPO

    cfg = load_config(REPO / "pipeline/cli/configs/dedup-ivf.yaml", [f"run_dir={tmp_path / 'run'}"])
    jobs = submit(cfg, dry_run=True, skip_complete=False)
    assert [(j.stage, j.role) for j in jobs] == [
        ("dedup_train", "single"), ("dedup_assign", "tasks"), ("dedup_assign", "finalize"),
        ("dedup_search", "tasks"), ("dedup_search", "finalize"), ("dedup_group", "single")]
    assert jobs[3].after == ["dedup_assign:finalize"] and jobs[-1].after == ["dedup_search:finalize"]
    script = (tmp_path / "run/slurm/dedup_search.sbatch").read_text()
    assert "#SBATCH --array=0-99%100" in script and "--step search" in script and "--no-finalize" in script


@pytest.mark.slurm
def test_the_steps_as_slurm_array_jobs_give_the_local_artifact(slurm_cluster, planted, tmp_path):
    from tests.slurm_helpers import array_states, wait_jobs, write_config
    from tests.test_slurm import _submit

    out, query, reference, clean = planted
    args = {"query": str(query), "reference": str(reference), "method": "ivf", **IVF}
    stage = lambda step, **more: {"command": "dedup", "args": {**args, "step": step}, "out": "dd", **more}
    stages = {"dd_train": stage("train", outputs=["_ivf/train"]),
              "dd_assign": stage("assign", outputs=["_ivf/assign"], mode="array", array=2, needs=["dd_train"]),
              "dd_search": stage("search", outputs=["_ivf/search"], mode="array", array=3, needs=["dd_assign"]),
              "dd_group": stage("group", needs=["dd_search"])}
    ids = _submit(write_config(tmp_path / "ivf.yaml", tmp_path / "run", stages, env={"OMP_NUM_THREADS": 1}))
    assert list(ids) == ["dd_train:single", "dd_assign:tasks", "dd_assign:finalize", "dd_search:tasks",
                         "dd_search:finalize", "dd_group:single"]
    wait_jobs(list(ids.values()), timeout_s=300)
    assert array_states(ids["dd_assign:tasks"]) == ["COMPLETED"] * 2
    assert array_states(ids["dd_search:tasks"]) == ["COMPLETED"] * 3
    assert part_files(tmp_path / "run/dd") == part_files(out / "clean")
    assert mf.load(tmp_path / "run/dd").id == mf.load(clean).id


PQ = {**IVF, "pq": 8}


@pytest.fixture(scope="module")
def with_pq(planted, tmp_path_factory):
    out, query, reference, _ = planted
    folder = tmp_path_factory.mktemp("pq") / "pq"
    return folder, dedup_ivf(query, folder, reference=reference, **PQ)


def test_pq_finds_the_planted_groups_and_its_pairs_are_a_subset_of_the_exact_ones(planted, with_pq):
    out, query, _, _ = planted
    folder, manifest = with_pq
    assert _rows(folder) == EXPECTED and _pairs(folder) == _pairs(out / "clean")
    keys, matrix = load_embeddings(open_logits(query), 64)
    rows, cols, _ = near_pairs(matrix, 0.95, 32, 64)
    names = keys.to_pylist()
    assert _pairs(folder) <= {frozenset((names[r], names[c])) for r, c in zip(rows, cols)}
    params = mf.load(manifest, kind="exclusion").params
    assert params["pq"] == 8 and params["pq_bits"] == 8 and params["pq_margin"] == 0.1
    assigned = pq.read_table(folder / "_ivf/assign/part-000000.parquet")
    assert "embedding" not in assigned.column_names and assigned.schema.field("pq_code").type.byte_width == 8
    np.testing.assert_allclose(pq.read_table(folder / "part-000000.parquet").column("similarity").to_numpy(),
                               pq.read_table(out / "clean/part-000000.parquet").column("similarity").to_numpy(),
                               atol=1e-6)


def test_pq_with_no_margin_never_gives_a_false_pair(planted, tmp_path):
    out, query, reference, _ = planted
    dedup_ivf(query, tmp_path / "m0", reference=reference, **PQ, pq_margin=0.0, threshold=0.9)
    sims = np.concatenate([pq.read_table(p, columns=["sim"]).column("sim").to_numpy()
                           for p in sorted((tmp_path / "m0/_ivf/search").glob("part-*.parquet"))])
    assert (sims >= 0.9).all()


def test_pq_three_tasks_per_step_give_the_bytes_of_one(planted, with_pq, tmp_path):
    _, query, reference, _ = planted
    folder, _ = with_pq
    for step in ("train", "assign", "search", "group"):
        for task in (1, 2, 0):
            dedup_ivf(query, tmp_path / "t3", reference=reference, step=step, task_index=task, num_tasks=3, **PQ)
    assert part_files(tmp_path / "t3") == part_files(folder)
    for sub in ("_ivf/train", "_ivf/assign", "_ivf/search", "."):
        assert mf.load(tmp_path / "t3" / sub).id == mf.load(folder / sub).id


def test_pq_bad_settings_are_named_errors(planted, tmp_path):
    _, query, _, _ = planted
    with pytest.raises(InputError, match="--pq 5: must divide the embedding dimension 32"):
        dedup_ivf(query, tmp_path / "bad", **{**PQ, "pq": 5})
    with pytest.raises(InputError, match="--pq-margin"):
        dedup_ivf(query, tmp_path / "bad2", **PQ, pq_margin=1.5)
    dedup_ivf(query, tmp_path / "off", step="train", **IVF)
    with pytest.raises(InputError, match="made with pq=0, this step was given 8"):
        dedup_ivf(query, tmp_path / "off", step="assign", **PQ)


def test_pq_from_the_cli_gives_the_bytes_of_the_api(planted, with_pq, tmp_path):
    _, query, reference, _ = planted
    folder, _ = with_pq
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PQ.items()]
    assert main(["dedup", "--query", str(query), "--reference", str(reference), "--out", str(tmp_path / "cli"),
                 "--method", "ivf", *flags]) == 0
    assert part_files(tmp_path / "cli") == part_files(folder)

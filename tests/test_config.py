"""Pipeline configs (YAML, schema, --set, ${stage} references, hash) and `kdpipe run` (skip complete stages,
resume partial ones part by part, in-process or as subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.cli.run import run_pipeline
from pipeline.config import CONFIG_HASH_ENV, config_from_dict, load_config, load_resolved, stage_argv, stage_env
from pipeline.errors import InputError
from tests.slurm_helpers import REPO, part_digests

FAKE = {"command": "slow", "entry": "tests.fake_stage", "args": {"parts": 4, "rows": 3}}


def _config(tmp_path: Path, stages: dict, overrides=(), **top) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "workdir": str(REPO), "stages": stages,
                                    **top}, sort_keys=False))
    return path


def test_references_resolve_to_output_folders_and_become_dependencies(tmp_path):
    cfg = config_from_dict({"run_dir": "r", "stages": {
        "data": {"command": "ingest", "argv": ["digits"], "outputs": ["labeled", "test"]},
        "logits": {"command": "logits", "args": {"data": "${data}/labeled", "topk": 10, "embeddings": True,
                                                "no_finalize": False, "tags": ["a", 2]}, "out": "lg"},
        "check": {"command": "verify", "argv": ["${logits}/manifest.json", "$${literal}"], "out": None}}},
        cwd=tmp_path)
    data, logits, check = cfg.stages.values()
    assert data.out == tmp_path / "r" / "data" and logits.out == tmp_path / "r" / "lg"
    assert data.manifests == [tmp_path / "r/data/labeled/manifest.json", tmp_path / "r/data/test/manifest.json"]
    assert stage_argv(logits) == ["logits", "--data", f"{tmp_path}/r/data/labeled", "--topk", "10", "--embeddings",
                                  "--tags", "a", "2", "--out", f"{tmp_path}/r/lg"]
    assert stage_argv(check) == ["verify", f"{tmp_path}/r/lg/manifest.json", "${literal}"]
    assert (logits.needs, check.needs) == (["data"], ["logits"])
    assert (data.mode, logits.mode, check.mode) == ("array", "array", "single")
    assert check.outputs == [] and check.out is None


@pytest.mark.parametrize("stages, message", [
    ({"a": {"command": "verify", "argv": ["${b}"]}, "b": {"command": "ingest"}}, "${b} is not a stage"),
    ({"a": {"command": "verify", "argv": ["${nope}/x"]}}, "${nope} is not a stage"),
    ({"a": {"command": "ingest", "array": 0}}, "'stages.a.array'"),
    ({"a": {"command": "ingest", "colour": "red"}}, "'stages.a'"),
    ({"a": {"command": "ingest", "slurm": {"gpus": "two"}}}, "'stages.a.slurm.gpus'"),
    ({"a": {"command": "ingest", "needs": ["z"]}}, "needs z"),
    ({}, "'stages'"),
])
def test_bad_configs_are_refused_naming_the_field(stages, message):
    with pytest.raises(InputError, match=message.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
        config_from_dict({"stages": stages})


def test_set_overrides_nested_typed_values_and_changes_the_hash(tmp_path):
    path = _config(tmp_path, {"data": {"command": "ingest", "args": {"shard_size": 100}}})
    base = load_config(path)
    cfg = load_config(path, ["stages.data.args.shard_size=7", "slurm.partition=gpu", "stages.data.array=3",
                             "env.OMP_NUM_THREADS=2"])
    stage = cfg.stages["data"]
    assert stage.args["shard_size"] == 7 and stage.array == 3 and stage.slurm["partition"] == "gpu"
    assert stage.env == {"OMP_NUM_THREADS": "2"}
    assert cfg.hash != base.hash and load_config(path).hash == base.hash
    assert stage_env(cfg, stage)[CONFIG_HASH_ENV] == cfg.hash
    for bad in ["stages.data.args.shard_size", "=3", "stages..x=1", "stages.data.command.x=1"]:
        with pytest.raises(InputError, match="--set"):
            load_config(path, [bad])
    with pytest.raises(InputError, match="stages.data.array"):
        load_config(path, ["stages.data.array=-1"])


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("stages: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError, match="not a readable YAML config"):
        load_config(path)


# --- kdpipe run ---------------------------------------------------------------------------------------------

def test_run_makes_complete_verified_outputs_then_skips_them(tmp_path):
    path = _config(tmp_path, {"fake": FAKE, "check": {"command": "verify", "argv": ["${fake}/manifest.json"],
                                                      "out": None}})
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run" / "fake"
    manifest = mf.load(out)
    cfg = load_config(path)
    assert manifest.data["producer"]["config_hash"] == cfg.hash
    saved = json.loads((out / "_config" / f"config-{cfg.hash[:12]}.json").read_text())
    assert saved["config_hash"] == cfg.hash and saved["config"]["stages"]["fake"]["out"] == str(out)
    assert load_resolved(tmp_path / "run").hash == cfg.hash
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    outcomes = run_pipeline(cfg)
    assert [(o.name, o.status) for o in outcomes] == [("fake", "skipped"), ("check", "done")]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_run_resumes_a_partial_stage_part_by_part_and_redoes_a_damaged_one(tmp_path):
    path = _config(tmp_path, {"fake": FAKE})
    cfg = load_config(path)
    assert run_pipeline(cfg)[0].status == "done"
    out = tmp_path / "run" / "fake"
    clean = part_digests(out)
    clean_id = mf.load(out).id
    (out / "manifest.json").unlink()
    (out / "_parts" / "part-000002.json").unlink()                  # part 2 never committed
    (out / "part-000003.tar").write_bytes(b"damaged")               # part 3 damaged after its commit
    untouched = (out / "part-000000.tar").stat().st_mtime_ns
    assert run_pipeline(cfg)[0].status == "done"
    assert part_digests(out) == clean and mf.load(out).id == clean_id
    assert (out / "part-000000.tar").stat().st_mtime_ns == untouched


def test_a_damaged_complete_stage_is_not_skipped(tmp_path):
    path = _config(tmp_path, {"fake": FAKE})
    cfg = load_config(path)
    run_pipeline(cfg)
    out = tmp_path / "run" / "fake"
    (out / "part-000001.tar").write_bytes(b"x")
    assert run_pipeline(cfg)[0].status == "done"  # not skipped: part 1 is redone, the manifest (same id) kept
    assert run_pipeline(cfg)[0].status == "skipped"


def test_a_failing_stage_stops_the_chain_with_its_exit_code(tmp_path):
    path = _config(tmp_path, {"bad": {"command": "ingest", "argv": [str(tmp_path / "missing")]},
                              "after": FAKE})
    outcomes = run_pipeline(load_config(path))
    assert [(o.name, o.status, o.code) for o in outcomes] == [("bad", "failed", 2)]


def test_run_in_subprocesses_gives_the_same_manifest_ids(tmp_path):
    ids = []
    for sub in ("a", "b"):
        folder = tmp_path / sub
        folder.mkdir()
        path = _config(folder, {"fake": FAKE})
        argv = ["run", str(path), "--stages", "fake"] + (["--subprocess"] if sub == "b" else [])
        assert main(argv) == 0
        ids.append(mf.load(folder / "run" / "fake").id)
    assert ids[0] == ids[1]


def test_unknown_stage_names_are_refused(tmp_path):
    path = _config(tmp_path, {"fake": FAKE})
    with pytest.raises(InputError, match="unknown stage"):
        load_config(path).select(["fake,nope"])

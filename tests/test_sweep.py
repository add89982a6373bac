"""``kdpipe sweep``: a grid of variants of one stage as one ordinary config (shared stages once, the varied stage
and its dependents copied per variant and seed), run end to end with its comparison report, submitted to SLURM
as ordinary jobs, and the bundled experiment configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.cli.commands.demo import config_path
from pipeline.cli.submit import submit
from pipeline.cli.sweep import PLAN_NAME, experiments, parse_values, plan_sweep
from pipeline.config import load_config
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "env": {"OMP_NUM_THREADS": 1},
    "stages": {
        "data": {"command": "ingest", "argv": ["digits"], "mode": "single", "outputs": ["labeled", "test"],
                 "args": {"split": "labeled=3/class:first,test=60", "shard_size": 100}},
        "teacher": {"command": "teacher", "args": {"train": "${data}/labeled", "epochs": 2, "batch_size": 8,
                                                   "threads": 1}},
        "student": {"command": "train", "mode": "single",
                    "args": {"train": "${data}/labeled", "epochs": 1, "batch_size": 8, "lr": 0.05, "threads": 1}},
        "logits_test": {"command": "logits", "args": {"data": "${data}/test", "teacher": "${teacher}", "topk": 5,
                                                      "temperature": 2.0, "num_workers": 0, "threads": 1}},
        "eval_teacher": {"command": "evaluate", "args": {"model": "${teacher}", "data": "${data}/test",
                                                         "teacher_logits": "${logits_test}", "num_workers": 0}},
        "eval_student": {"command": "evaluate", "args": {"model": "${student}", "data": "${data}/test",
                                                         "teacher_logits": "${logits_test}", "num_workers": 0}},
    },
}
GRID = ["--stage", "student", "--vary", "lr=0.05,0.01", "--seeds", "2"]


def _tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = root / "run"
    assert main(["sweep", str(_tiny(root)), *GRID, "--out", str(out)]) == 0
    return out


def test_a_sweep_runs_every_variant_in_its_own_folder_and_shares_the_rest(swept):
    lrs = {}
    for folder in ("student", "lr-0_05-s1/student", "lr-0_01-s0/student", "lr-0_01-s1/student"):
        training = mf.load(swept / folder, kind="model").params["training"]
        lrs[folder] = (training["lr"], training["seed"])
    assert lrs == {"student": (0.05, 0), "lr-0_05-s1/student": (0.05, 1), "lr-0_01-s0/student": (0.01, 0),
                   "lr-0_01-s1/student": (0.01, 1)}
    copies = [p.parent.relative_to(swept).as_posix() for p in swept.rglob("teacher/manifest.json")]
    assert copies == ["teacher"]  # unvaried: trained once
    evaluation = mf.load(swept / "lr-0_01-s1" / "eval_student", kind="report")
    assert evaluation.params["model_id"] == mf.load(swept / "lr-0_01-s1" / "student").id


def test_the_report_holds_mean_and_spread_of_the_runs_it_names(swept, capsys):
    (report,) = swept.glob("report-*")
    assert main(["verify", str(report)]) == 0
    names = {f["path"] for f in mf.load(report, kind="report").files}
    assert names == {"sweep.json", "sweep.md", "confusion_matrices.png", "training_curves.png"}
    summary = json.loads((report / "sweep.json").read_text())
    rows = {(r["stage"], r["variant"]): r for r in summary["rows"]}
    assert sorted(rows) == [("eval_student", "lr=0.01"), ("eval_student", "lr=0.05"), ("eval_teacher", None)]
    assert rows[("eval_teacher", None)]["n"] == 1
    for row in (rows[("eval_student", "lr=0.01")], rows[("eval_student", "lr=0.05")]):
        top1 = [json.loads((Path(r["folder"]) / "report.json").read_text())["metrics"]["top1"] for r in row["runs"]]
        assert row["n"] == 2 and [r["seed"] for r in row["runs"]] == [0, 1]
        assert row["top1"] == pytest.approx(np.mean(top1)) and row["top1_sd"] == pytest.approx(np.std(top1, ddof=1))
        assert len(row["per_class"]) == 10 and row["agreement"] is not None and row["kl"] > 0
    assert "| lr=0.01 | 2 |" in (report / "sweep.md").read_text()


def test_a_rerun_resumes_changes_nothing_and_prints_the_table(swept, capsys, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in swept.rglob("*") if p.is_file()}
    assert main(["sweep", str(_tiny(tmp_path)), *GRID, "--out", str(swept)]) == 0
    printed = capsys.readouterr().out
    assert "| eval_student | lr=0.01 | 2 |" in printed and "| eval_teacher | (all) | 1 |" in printed
    changed = sorted(str(p.relative_to(swept)) for p in swept.rglob("*") if p.is_file()
                     and before.get(p) != p.stat().st_mtime_ns)
    assert all("_config" in c or c.endswith(("config.resolved.json", PLAN_NAME)) for c in changed), changed


def test_the_sweep_config_submits_as_ordinary_slurm_jobs_chained_by_copies(tmp_path):
    plan = plan_sweep(_tiny(tmp_path), stage="student", vary=["lr=0.05,0.01"], seeds=2, out=tmp_path / "run")
    config = load_config(tmp_path / "run" / PLAN_NAME)
    assert config.hash == plan.config.hash  # the written file is the sweep, exactly
    jobs = {j.key: j for j in submit(config, dry_run=True)}
    assert set(jobs["eval_student-lr-0_01-s1:single"].after) == {"data:single", "logits_test:finalize",
                                                                 "student-lr-0_01-s1:single"}
    assert {"logits_test:tasks", "logits_test:finalize", "teacher:single"} <= set(jobs)  # arrays stay arrays
    script = (tmp_path / "run" / "slurm" / "student-lr-0_01-s1.sbatch").read_text()
    assert "--lr 0.01" in script and "--seed 1" in script and "lr-0_01-s1/student" in script


def test_the_first_run_of_a_sweep_is_the_plain_config(tmp_path):
    plain = load_config(config_path(), [f"run_dir={tmp_path}"])
    plan = plan_sweep(config_path(), stage="student_pl_ft", vary=["lr=0.0002,0.0005"], seeds=2,
                      seed_stages=["student_pl", "student_pl_ft"], out=tmp_path)
    for name, stage in plain.stages.items():
        assert plan.config.stages[name].argv == stage.argv and plan.config.stages[name].out == stage.out, name
    run = next(r for r in plan.runs if r.name == "lr=0.0005 seed=1")
    assert run.copies["student_pl"] == "student_pl-s1" and run.copies["teacher"] == "teacher"
    assert plan.raw["stages"]["student_pl_ft-lr-0_0005-s1"]["args"]["init"] == "${student_pl-s1}"
    assert plan.raw["stages"]["eval_pl_ft-lr-0_0005-s1"]["args"]["model"] == "${student_pl_ft-lr-0_0005-s1}"


def test_named_variants_cross_the_grid_and_copy_only_what_differs(tmp_path):
    plan = plan_sweep(Path(experiments_folder() / "consistency.yaml"), out=tmp_path)
    assert [r.name for r in plan.runs] == [f"{v} epochs={e}" for v in ("inconsistent", "consistent", "multi-view")
                                           for e in (8, 32)]
    logits = {r.name: r.copies["logits"] for r in plan.runs}
    assert logits["consistent epochs=32"] == logits["inconsistent epochs=8"] == "logits"
    assert logits["multi-view epochs=8"] == logits["multi-view epochs=32"] == "logits-multi-view"
    assert plan.raw["stages"]["logits-multi-view"]["args"]["views"] == 8
    assert plan.raw["stages"]["select-multi-view"]["args"]["logits"] == "${logits-multi-view}"


def experiments_folder() -> Path:
    return REPO / "pipeline" / "cli" / "configs" / "experiments"


@pytest.mark.parametrize("name", ["alpha", "temperature", "consistency", "blind", "finetune"])
def test_bundled_experiments_plan_cite_their_source_and_ship_as_package_data(name, tmp_path):
    assert name in experiments()
    plan = plan_sweep(experiments_folder() / f"{name}.yaml", out=tmp_path)
    assert "arXiv:" in plan.spec.source and plan.spec.title
    assert all(s in plan.config.stages for s in plan.spec.evaluate)
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "configs/experiments/*.yaml" in globs["pipeline.cli"]
    assert main(["run", str(experiments_folder() / f"{name}.yaml"), "--set", f"run_dir={tmp_path / 'plain'}",
                 "--stages", "data"]) == 0  # the bundled file is an ordinary config too


def test_parse_values_takes_commas_or_a_yaml_list():
    assert parse_values("0,0.5,1") == [0, 0.5, 1]
    assert parse_values("[rrc:0.35-1, 'rrc:0.35-1,flip:0.5']") == ["rrc:0.35-1", "rrc:0.35-1,flip:0.5"]
    assert parse_values("true,null") == [True, None]


@pytest.mark.parametrize("argv, message", [
    (["--stage", "nope", "--vary", "lr=1,2"], "--stage 'nope': give the stage to sweep"),
    (["--stage", "student", "--vary", "lr"], "--vary 'lr': expected key=v1,v2"),
    (["--stage", "student", "--vary", "ghost.lr=1,2"], "'ghost' is not a stage"),
    (["--stage", "student"], "nothing to sweep"),
    (["--stage", "student", "--vary", "lr=1,2", "--seeds", "0"], "--seeds 0: must be >= 1"),
    (["--stage", "student", "--vary", "lr=1", "--vary", "lr=2"], "--vary lr: given twice"),
])
def test_bad_sweeps_are_named_errors(argv, message, tmp_path, caplog):
    assert main(["sweep", str(_tiny(tmp_path)), *argv, "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert message in caplog.text


def test_unknown_experiment_and_missing_config_are_named(tmp_path, caplog):
    assert main(["sweep", "--experiment", "nope"]) == 2
    assert "not a bundled experiment; choose one of alpha, blind, consistency, finetune, temperature" in caplog.text
    assert main(["sweep"]) == 2 and "give a CONFIG file or --experiment NAME" in caplog.text
    with pytest.raises(InputError, match="is absolute or holds a"):
        body = {**TINY, "stages": {**TINY["stages"], "student": {**TINY["stages"]["student"], "out": "/abs/s"}}}
        (tmp_path / "abs.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        plan_sweep(tmp_path / "abs.yaml", stage="student", vary=["lr=1,2"], out=tmp_path / "o")

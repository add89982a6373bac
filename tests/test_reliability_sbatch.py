"""Hostile config values against the generated sbatch scripts, run through a fake ``sbatch``.

Each payload -- ``"; touch X #``, ``'; touch X #``, ``$(touch X)``, backquotes, and ``x\\n#SBATCH --uid=0`` -- is
put into each config field that reaches a script (config name, run_dir, workdir, python, stage name, argv, an
args value, an args key, an env value (global and per stage), an env name, out, every slurm directive field and
an extra directive). ``kdpipe submit`` then calls a fake ``sbatch`` (on PATH) that records the directives sbatch
would read (the ``#SBATCH`` lines before the first command) and runs the script with bash, as a job would.

Expected, for every (field, payload): refused with ``InputError`` before any script is submitted (config name,
run_dir -- it is in ``--output`` --, stage name, args key, env name, every ``#SBATCH`` field), or quoted
(workdir, python, argv, args value, env values, out): every job ran and the file X never appears, no directive
beyond the field-free baseline appears (no ``--uid``), and the kdpipe process received exactly the argv of the
config (the payload as one intact argument). ``slurm.preamble`` is shell code by design (``module load ...``) and
is the one field not quoted; it is documented as such and not fed payloads here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.cli.submit import submit
from pipeline.config import config_from_dict, stage_argv
from pipeline.errors import InputError

PAYLOADS = {"dquote": '"; touch {m} #', "squote": "'; touch {m} #", "subshell": "$(touch {m})",
            "backquote": "`touch {m}`", "directive": "x\n#SBATCH --uid=0"}
SLURM_FIELDS = ("partition", "account", "qos", "constraint", "mem", "time", "finalize_time", "max_parallel")
REFUSED = {"name", "run_dir", "stage_name", "arg_key", "env_name", "extra_directive"}  # and every slurm.* field
FIELDS = ("name", "run_dir", "workdir", "python", "stage_name", "argv", "arg_value", "arg_key", "env_value",
          "stage_env_value", "env_name", "out", *(f"slurm.{k}" for k in SLURM_FIELDS), "extra_directive")


def _raw(tmp_path: Path, fake_python: Path) -> dict:
    return {"name": "demo", "run_dir": str(tmp_path / "run"), "workdir": str(tmp_path), "python": str(fake_python),
            "env": {"GLOBAL": "g"},
            "stages": {"s": {"command": "slow", "entry": "tests.fake_stage", "argv": ["pos"], "array": 2,
                             "args": {"parts": 2, "policy": "p"}, "env": {"LOCAL": "l"}}},
            "slurm": {"partition": "cpu", "time": "00:10:00", "signal_grace_s": 30, "preamble": None}}


def _inject(raw: dict, field: str, value: str) -> dict:
    stage = raw["stages"]["s"]
    if field in ("name", "python"):
        raw[field] = value
    elif field in ("run_dir", "workdir"):
        raw[field] = raw[field] + "/" + value
    elif field == "stage_name":
        raw["stages"] = {value: stage}
    elif field == "argv":
        stage["argv"] = ["pos", value]
    elif field == "arg_value":
        stage["args"]["policy"] = value
    elif field == "arg_key":
        stage["args"][value] = 1
    elif field == "env_value":
        raw["env"]["GLOBAL"] = value
    elif field == "stage_env_value":
        stage["env"]["LOCAL"] = value
    elif field == "env_name":
        stage["env"][value] = "v"
    elif field == "out":
        stage["out"] = value
    elif field == "extra_directive":
        raw["slurm"]["extra_directives"] = [f"--comment={value}"]
    else:
        raw["slurm"][field.split(".", 1)[1]] = value
    return raw


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """A fake python (records its argv per job) and a fake sbatch (records directives, runs the script)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    records = tmp_path / "records"
    records.mkdir()
    python = bin_dir / "python"
    python.write_text(f"#!{sys.executable}\nimport json, os, sys, uuid\n"
                      f"json.dump(sys.argv[1:], open(os.path.join({str(records)!r}, uuid.uuid4().hex), 'w'))\n")
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/bash\nscript=\"${@: -1}\"\n"
                      "awk '/^#SBATCH/ {print; next} /^#/ || /^[[:space:]]*$/ {next} {exit}' \"$script\" "
                      f">> {tmp_path / 'directives'}\n"
                      "env -u SLURM_JOB_ID bash \"$script\" >/dev/null 2>&1\necho $RANDOM\n")
    for tool in (python, sbatch):
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return python, records, tmp_path / "directives"


def _submit(raw: dict, tmp_path: Path):
    config = config_from_dict(raw, cwd=tmp_path)
    return config, submit(config, skip_complete=False)


def _baseline(tmp_path: Path, fakes) -> set[str]:
    python, records, directives = fakes
    _submit(_raw(tmp_path, python), tmp_path)
    lines = set(directives.read_text().splitlines())
    directives.unlink()
    for record in records.iterdir():
        record.unlink()
    return lines


@pytest.mark.parametrize("field", FIELDS)
def test_every_payload_in_every_field_is_quoted_or_refused(tmp_path, fakes, field):
    python, records, directives = fakes
    baseline = _baseline(tmp_path, fakes)
    outcomes = {}
    for name, template in PAYLOADS.items():
        marker = tmp_path / f"PWNED-{name}"
        value = template.format(m=marker)
        try:
            config, jobs = _submit(_inject(_raw(tmp_path, python), field, value), tmp_path)
        except InputError:
            outcomes[name] = "refused"
            continue
        assert not marker.exists(), f"{field}={value!r}: the payload ran"
        seen = set(directives.read_text().splitlines()) if directives.exists() else set()
        assert not any("--uid" in line for line in seen), f"{field}={value!r}: a directive was injected: {seen}"
        extra = {line for line in seen - baseline if not line.startswith(("#SBATCH --job-name=", "#SBATCH --output="))}
        if field not in ("extra_directive",) and not field.startswith("slurm."):
            assert not extra, f"{field}={value!r}: unexpected directives {extra}"
        argvs = [json.loads(p.read_text()) for p in records.iterdir()]
        if field != "python" and field != "workdir":
            stage = next(iter(config.stages.values()))
            expected = {json.dumps(["-m", "tests.fake_stage", *stage_argv(stage, args)])
                        for args in (stage.task_args, stage.finalize_args)}
            assert {json.dumps(a) for a in argvs} == expected, f"{field}={value!r}: argv changed: {argvs}"
        outcomes[name] = "quoted"
        for path in (directives, *records.iterdir()):
            path.unlink(missing_ok=True)
    expected = "refused" if field in REFUSED or field.startswith("slurm.") else "quoted"
    assert outcomes == {name: expected for name in PAYLOADS}

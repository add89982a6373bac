"""The package plan of ARCHITECTURE.md holds: layers, no stage-to-stage imports, no import moved into a function,
no import fallback, no import loop; and the light commands load neither torch nor matplotlib."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.layout_rules import violations

REPO = Path(__file__).resolve().parents[1]


def test_the_tree_follows_the_plan():
    assert violations(REPO) == []


@pytest.fixture()
def tree(tmp_path):
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(path: Path, text: str) -> int:
    """Append ``text`` to ``path``; return the line it starts on."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [text]) + "\n")
    return len(lines) + 1


PLANTS = [
    ("stages/select/policy.py", "from stages.logits.stage import compute_logits",
     "stage package select imports another stage package (stages.logits.stage)"),
    ("pipeline/parts.py", "from stages.shardio import read_shard", "core module pipeline.parts imports common module"),
    ("stages/artifacts/selection.py", "import pipeline.cli.commands.common",
     "artifacts module stages.artifacts.selection imports entry"),
    ("stages/reshard/plan.py", "def f():\n    from stages.artifacts.lineage import resolve_lineage\n    return resolve_lineage",
     "function-local import of stages.artifacts.lineage"),
    ("stages/imaging.py", "try:\n    import faiss\nexcept ImportError:\n    faiss = None", "`except ImportError` without a raise"),
]


@pytest.mark.parametrize("where, text, message", PLANTS, ids=[p[0] for p in PLANTS])
def test_a_planted_forbidden_import_is_named_with_its_file_and_line(tree, where, text, message):
    line = _plant(tree / where, text)
    found = violations(tree)
    assert len(found) == 1 and message in found[0], found
    assert found[0].startswith(f"{where}:") and int(found[0].split(":")[1]) in range(line, line + 3)


def test_a_planted_import_loop_is_named(tree):
    _plant(tree / "stages/artifacts/logits_format.py", "from stages.artifacts import logits_reader")
    assert violations(tree) == ["import loop: stages.artifacts.logits_format <-> stages.artifacts.logits_reader"]


LIGHT = {  # what the command imports before it does any work -> heavy modules it must not load
    "select": ["pipeline.cli.commands.select", "stages.select.stage", "stages.artifacts.logits_reader"],
    "verify": ["pipeline.cli.commands.verify", "pipeline.verify", "stages.artifacts.checks"],
    "status": ["pipeline.cli.commands.status", "pipeline.cli.status", "stages.artifacts.checks"],
    "dedup": ["pipeline.cli.commands.dedup", "stages.dedup.stage"],
    "reshard": ["pipeline.cli.commands.reshard", "stages.reshard.stage"],
}


@pytest.mark.parametrize("command", sorted(LIGHT))
def test_light_commands_import_neither_torch_nor_webdataset_nor_matplotlib(command):
    code = ("import importlib, json, sys\n"
            f"for name in {LIGHT[command]!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'webdataset', 'matplotlib') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout) == []

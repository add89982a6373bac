"""Chaos: seeded SIGKILLs at random instants of a whole ``kdpipe run`` (not only inside a part), each followed by a
plain rerun, and concurrent writers of one run folder; every run ends compared file by file with a clean run
(every manifest's id, the sha256 of every file a manifest lists; ``tests/chaos.py``).

Default suite: a 6-stage chain (ingest, teacher training, logits, select with report and gallery, reshard,
student training) run in-process, killed at 2 seeded instants in forked children (~25 s here).
``-m slow``: 30 seeded kills of ``kdpipe demo`` (its quick variant, ``chaos.QUICK_DEMO``; ~25 min here, also
``scripts/chaos_demo.py``), and two concurrent ``kdpipe demo`` into one folder, with the same and with other
parameters.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pipeline.cli.run import run_pipeline
from pipeline.config import load_config
from tests import chaos

MINI_CHAIN = """
name: mini
run_dir: {run_dir}
env: {{OMP_NUM_THREADS: 1}}
x-train: &train {{threads: 1, num_workers: 0, size: 28, seed: 0}}
stages:
  data:
    command: ingest
    argv: [digits]
    mode: single
    args: {{split: "labeled=5/class,unlabeled=200,unused=rest", shard_size: 100, seed: 0}}
    outputs: [labeled, unlabeled, unused]
  teacher:
    command: teacher
    args: {{<<: *train, train: "${{data}}/labeled", epochs: 3, batch_size: 10, lr: 0.05}}
  logits:
    command: logits
    args: {{data: "${{data}}/unlabeled", teacher: "${{teacher}}", topk: 3, temperature: 2.0, num_workers: 0}}
  select:
    command: select
    mode: single
    args: {{logits: "${{logits}}", per_class: 10, top_p: 2, soft_targets: true, gallery: 2}}
  reshard:
    command: reshard
    args: {{selection: "${{select}}", shard_size: 40}}
  student:
    command: train
    mode: single
    args: {{<<: *train, train: "${{reshard}}", loss: mix, epochs: 2, batch_size: 16, lr: 0.05}}
"""


def _mini(folder: Path, run_dir: Path) -> Path:
    path = folder / f"mini-{run_dir.name}.yaml"
    path.write_text(MINI_CHAIN.format(run_dir=run_dir))
    return path


def _run(config: Path) -> list[str]:
    return [o.status for o in run_pipeline(load_config(config))]


def test_seeded_kills_of_a_whole_run_then_plain_reruns_converge_to_the_clean_run(tmp_path, capsys):
    clean = tmp_path / "clean"
    started = time.monotonic()
    assert set(_run(_mini(tmp_path, clean))) == {"done"}
    window = 0.4 * (time.monotonic() - started)  # a warm run (imports done) takes about half of the first
    expected = chaos.snapshot(clean)
    assert len(expected) > 30  # every stage's manifest and files
    trials = []
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        at = random.Random(seed).uniform(0.3, window)
        killed = chaos.fork_kill_after(lambda: run_pipeline(load_config(_mini(tmp_path, out))), at)
        statuses = _run(_mini(tmp_path, out))  # plain rerun: no flag
        trials.append(chaos.Trial(seed, round(at, 2), killed, 0 if set(statuses) <= {"done", "skipped"} else 1,
                                  chaos.differences(expected, chaos.snapshot(out))))
    line = chaos.summary_line(trials)
    print(line)
    assert all(t.killed for t in trials) and line == "2 of 2 kills converged", [t.diffs[:5] for t in trials]


@pytest.mark.slow
def test_thirty_seeded_kills_of_kdpipe_demo_converge(tmp_path, capsys):
    """~25 min on a shared 2-core machine: 30 kills of the quick demo, each followed by a plain rerun."""
    clean = tmp_path / "clean"
    started = time.monotonic()
    assert chaos.run(chaos.demo_command(clean)) == 0
    window = time.monotonic() - started
    expected = chaos.snapshot(clean)
    trials = [chaos.kill_and_rerun(seed, chaos.demo_command, tmp_path / f"seed{seed}", expected, window)
              for seed in range(30)]
    line = chaos.summary_line(trials)
    print(line)
    assert line == f"{len([t for t in trials if t.killed])} of {len([t for t in trials if t.killed])} kills " \
                   "converged", [(t.seed, t.at_s, t.rerun_code, t.diffs[:3]) for t in trials if not t.converged]
    assert sum(t.killed for t in trials) >= 27


@pytest.mark.slow
def test_two_concurrent_demos_into_one_folder(tmp_path):
    """~3 min: the same parameters cooperate (both exit 0, the clean run's files); other parameters (select's
    per_class) are refused (exit 2) at the first stage that differs, and the winner's files are a clean run's."""
    clean, other_clean = tmp_path / "clean", tmp_path / "clean50"
    other = [*chaos.QUICK_DEMO, "stages.select.args.per_class=50"]
    assert chaos.run(chaos.demo_command(clean)) == 0
    assert chaos.run(chaos.demo_command(other_clean, other)) == 0
    same = tmp_path / "same"
    procs = [chaos.start(chaos.demo_command(same)) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert chaos.differences(chaos.snapshot(clean), chaos.snapshot(same)) == []
    mixed = tmp_path / "mixed"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [chaos.start(chaos.demo_command(mixed), logs[0]), chaos.start(chaos.demo_command(mixed, other), logs[1])]
    codes = [p.wait() for p in procs]
    assert sorted(codes) == [0, 2], codes
    loser = logs[codes.index(2)].read_text()
    assert "per_class" in loser and "Traceback" not in loser
    winner = clean if codes[0] == 0 else other_clean
    assert chaos.differences(chaos.snapshot(winner), chaos.snapshot(mixed)) == []

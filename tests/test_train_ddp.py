"""Two-process ``torchrun`` (gloo, CPU) training writes one model card that evaluates above chance."""

import os
import subprocess
import sys
from pathlib import Path

from pipeline import manifest as mf
from tests.test_train_data import digits, soft_shards

REPO = Path(__file__).resolve().parents[1]


def test_two_process_torchrun_trains_on_reshard_shaped_shards(tmp_path):
    made = digits(tmp_path / "digits", split="labeled=10/class,test=200,unlabeled=rest", shard_size=25)
    soft = soft_shards(made["labeled"], tmp_path / "soft", num_shards=4)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pipeline",
           "train", "--train", str(soft), "--eval", str(made["test"]), "--out", str(out), "--loss", "mix",
           "--epochs", "8", "--batch-size", "8", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    card = mf.load(out, kind="model")
    training = card.params["training"]
    assert training["world_size"] == 2 and training["steps"] == 8 * (100 // (2 * 8))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and '"samples": 96' in lines[0]  # both ranks' 6 batches of 8, summed
    assert card.params["metrics"]["top1"] > 0.3  # chance is 0.1

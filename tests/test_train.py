"""Training end to end on the bundled digits: accuracy, the model card, determinism, soft targets,
fine-tuning with --init and joined teacher logits, kill + plain rerun (resume), and refused inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import manifest as mf
from pipeline.cli import main
from pipeline.errors import FingerprintMismatch, InputError
from stages.artifacts.cards import load_classifier
from stages.shardio import ShardStats, read_shard
from stages.train.config import TrainConfig
from stages.train.loop import train
from tests.factories import make_logits
from tests.test_train_data import digits, soft_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("digits")
    made = digits(base, split="labeled=10/class,test=200,unlabeled=rest", shard_size=25)
    made["soft"] = soft_shards(made["labeled"], base / "soft", num_shards=4)
    return made


def _config(**kw) -> TrainConfig:
    base = {"epochs": 10, "batch_size": 16, "lr": 0.05, "checkpoint_every": 0, "threads": 1}
    return TrainConfig(**{**base, **kw})


def test_hard_training_on_labeled_digits_beats_chance_and_writes_a_model_card(data, tmp_path):
    card = train([data["labeled"]], tmp_path / "m", _config(), eval_data=data["test"])
    manifest = mf.load(card, kind="model")
    metrics = manifest.params["metrics"]
    assert metrics["top1"] > 0.5 and metrics["eval_samples"] == 200  # chance is 0.1
    roles = {(i["role"], i["id"]) for i in manifest.inputs}
    assert roles == {("train", mf.load(data["labeled"]).id), ("eval", mf.load(data["test"]).id)}
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(10)) and lines[-1]["step"] == 10 * (100 // 16)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (tmp_path / "m" / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    model, _ = load_classifier(card)
    assert manifest.params["training"]["steps"] == 60 and model.fc.out_features == 10


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(data, tmp_path):
    sha = [mf.load(train([data["labeled"]], tmp_path / f"r{i}", _config(epochs=2, seed=s))).params["weights_sha256"]
           for i, s in enumerate((3, 3, 4))]
    assert sha[0] == sha[1] != sha[2]


def test_soft_and_mix_losses_train_on_reshard_shaped_shards(data, tmp_path):
    soft = mf.load(train([data["soft"]], tmp_path / "s", _config(loss="soft"), eval_data=data["test"]))
    mix = mf.load(train([data["soft"]], tmp_path / "x", _config(loss="mix", alpha=0.5, epochs=3)))
    assert soft.params["metrics"]["top1"] > 0.5
    assert soft.params["training"]["loss"] == "soft" and mix.params["training"]["alpha"] == 0.5


def test_fine_tuning_from_a_model_folder_keeps_distilling_with_joined_teacher_logits(data, tmp_path):
    pre = train([data["soft"]], tmp_path / "pre", _config(loss="soft", epochs=5))
    labeled = mf.load(data["labeled"])
    rng = np.random.default_rng(0)
    shards = []
    for entry in labeled.files:
        samples = list(read_shard(labeled.file_path(entry), ShardStats("x")))
        labels = np.array([int(f["cls"]) for _, f in samples])
        shards.append(([k for k, _ in samples], rng.normal(size=(len(samples), 10)) + 4 * np.eye(10)[labels]))
    logits = make_logits(tmp_path / "logits", shards, topk=3, temperature=2.0, dataset_id=labeled.id)
    card = train([data["labeled"]], tmp_path / "ft", _config(loss="mix", epochs=5, lr=0.03), init=tmp_path / "pre",
                 teacher_logits=[logits], eval_data=data["test"])
    manifest = mf.load(card)
    roles = {i["role"]: i["id"] for i in manifest.inputs}
    assert roles["init"] == mf.load(pre).id and roles["teacher_logits"] == mf.load(logits).id
    assert manifest.params["metrics"]["top1"] > 0.5


def test_refused_inputs_name_what_to_change(data, tmp_path):
    other = digits(tmp_path / "three", split="labeled=3/class,rest=rest")
    logits = make_logits(tmp_path / "lg", [(["a"], np.zeros((1, 10)))], topk=3)
    with pytest.raises(Exception, match="logits of dataset .* give the logits of this dataset"):
        train([data["labeled"]], tmp_path / "a", _config(loss="soft"), teacher_logits=[logits])
    first = train([other["labeled"]], tmp_path / "b", _config(epochs=1))
    mtime = first.stat().st_mtime_ns
    assert train([other["labeled"]], tmp_path / "b", _config(epochs=1)) == first  # finished: no work
    assert first.stat().st_mtime_ns == mtime
    with pytest.raises(FingerprintMismatch, match="config.seed: 0 -> 5"):
        train([other["labeled"]], tmp_path / "b", _config(epochs=1, seed=5))
    weights = mf.load(first).params["weights_sha256"]
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(FingerprintMismatch, match=r"other inputs or parameters \(config.lr: 0.05 -> 0.5\)"):
        train([other["labeled"]], tmp_path / "b", _config(epochs=1, lr=0.5))
    again = train([other["labeled"]], tmp_path / "b", _config(epochs=1))  # same run: resumes, no flag
    assert mf.load(again).params["weights_sha256"] == weights
    from safetensors.torch import save_file

    from stages.models.classifiers import build_model
    save_file(build_model("smallcnn", 3).state_dict(), str(tmp_path / "three.safetensors"))
    with pytest.raises(InputError, match="do not fit this model .*fc.weight"):
        train([other["labeled"]], tmp_path / "c", _config(epochs=1), init=tmp_path / "three.safetensors")


def _cli(out: Path, data, extra=()) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--train", str(data["soft"]), "--out", str(out),
            "--loss", "mix", "--epochs", "4", "--batch-size", "4", "--checkpoint-every", "7", "--num-workers", "2",
            "--shuffle-buffer", "20", "--threads", "1", *extra]


def test_sigkill_then_resume_finishes_the_same_steps_with_the_same_weights(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert main(_cli(tmp_path / "full", data)[3:]) == 0  # the reference run, in this process
    proc = subprocess.Popen(_cli(tmp_path / "cut", data), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pointer = tmp_path / "cut" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    killed_at = json.loads(pointer.read_text())["step"]
    assert not (tmp_path / "cut" / "manifest.json").exists() and 0 < killed_at < 100
    subprocess.run(_cli(tmp_path / "cut", data), check=True, env=env, cwd=REPO, capture_output=True)  # no flag
    full, cut = mf.load(tmp_path / "full"), mf.load(tmp_path / "cut")
    assert cut.params["training"]["steps"] == full.params["training"]["steps"] == 4 * (100 // 4)
    assert cut.params["weights_sha256"] == full.params["weights_sha256"]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text().count("\n") == 4

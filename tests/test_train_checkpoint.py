"""Checkpoints (safetensors + JSON, no pickle, atomic pointer) and rank discovery."""

import json

import pytest
import torch

from pipeline.errors import IntegrityError
from stages.models.classifiers import build_model
from stages.train.checkpoint import POINTER, load_latest, save_checkpoint
from stages.train.config import lr_factor
from stages.train.distributed import discover


def _trained():
    torch.manual_seed(0)
    model = build_model("smallcnn", 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        loss = model(torch.randn(2, 3, 16, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_checkpoint_round_trip_restores_model_optimizer_scheduler_and_state(tmp_path):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path, 3, model.state_dict(), opt, sched, {"step": 3, "positions": [5, 7]})
    loaded = load_latest(tmp_path)
    fresh = build_model("smallcnn", 4)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 0.5 ** s)
    fresh_opt.load_state_dict(loaded.optimizer)
    fresh_sched.load_state_dict(loaded.scheduler)
    assert loaded.state == {"step": 3, "positions": [5, 7]} and fresh_sched.last_epoch == 3
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert len(opt.state_dict()["state"]) == len(fresh_opt.state_dict()["state"]) > 0
    for key, value in opt.state_dict()["state"].items():
        assert torch.equal(fresh_opt.state_dict()["state"][key]["momentum_buffer"], value["momentum_buffer"])
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())
    assert loaded.path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_only_the_newest_checkpoints_are_kept_and_the_pointer_names_the_last(tmp_path):
    model, opt, sched = _trained()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model.state_dict(), opt, sched, {"step": step}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    assert names == ["step-000000004.safetensors", "step-000000006.safetensors"]
    assert json.loads((tmp_path / POINTER).read_text())["step"] == 6 and load_latest(tmp_path).state["step"] == 6


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    model, opt, sched = _trained()
    path = save_checkpoint(tmp_path, 1, model.state_dict(), opt, sched, {})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="step-000000001.safetensors: missing or its sha256 differs"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "none") is None


def test_rank_discovery_from_torchrun_then_slurm_then_single_process():
    assert discover({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "3"}) == (1, 4, 1)
    assert discover({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (3, 8, 1)
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)
    assert discover({}) == (0, 1, 0)


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0 and lr_factor(6, 10, 2) == pytest.approx(0.5) and lr_factor(10, 10, 2) == 0.0

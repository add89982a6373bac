"""The training loop: one process or one rank of a ``torchrun`` / SLURM job (DDP), with exact resume.

Every rank runs the same number of steps (``DataPlan.steps_per_epoch`` x epochs). The run is a pure
function of its inputs and ``TrainConfig`` on one machine: weights are initialised from the seed, the
data order and views come from seeded RNGs, and the dropout RNG is re-seeded from (seed, step, rank)
before every step, so a run killed and resumed from its last checkpoint ends with the same weights as
an uninterrupted one. On CUDA: bf16 autocast and channels_last.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline import manifest as mf
from pipeline.errors import FingerprintMismatch, InputError, IntegrityError
from pipeline.hashing import sha256_json
from pipeline.lease import Lease, take
from pipeline.progress import Progress
from stages import imaging
from stages.artifacts.cards import write_card
from stages.models.classifiers import build_model
from stages.models.evaluation import accuracy
from stages.train import checkpoint as ckpt
from stages.train import distributed as dd
from stages.train.config import CODE_VERSION, TrainConfig, lr_factor
from stages.train.data import DataPlan, make_loader, verify_shards
from stages.train.inputs import TrainInputs, load_initial, load_inputs, make_plan
from stages.train.losses import distillation_loss, teacher_distribution
from stages.train.outputs import plot_losses, write_metrics

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
REASONS = ("empty_image", "corrupt_image", "too_many_pixels", "format_not_allowed", "unsupported_mode",
           "missing_image", "missing_label", "bad_label", "missing_soft_targets", "bad_soft_targets",
           "missing_partner", "duplicate_key", "unsafe_key", "bad_member_name", "other")


@dataclass
class Run:
    """A training run in progress on this rank."""

    env: dd.DistEnv
    config: TrainConfig
    inputs: TrainInputs
    plan: DataPlan
    out: Path
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fingerprint: str
    fingerprint_body: dict
    lineage: list[tuple[mf.Manifest, str]]
    eval_data: mf.Manifest | None
    lease: Lease
    state: dict = field(default_factory=dict)
    finished: bool = False


def train(train: list[str | Path], out: str | Path, config: TrainConfig, *, init: str | Path | None = None,
          teacher_logits: list[str | Path] | None = None, eval_data: str | Path | None = None,
          resume: bool = True, kind: str = "model", stage: str = "train") -> Path:
    """Train a classifier on dataset manifests and write its card (``kind`` model or teacher) in ``out``.

    Args:
        train: dataset manifests (labeled shards, or reshard output with soft targets).
        out: the run's folder: checkpoints/, metrics.jsonl, loss_curve.png, weights + card.
        config: architecture, loss, schedule, data and augmentation parameters.
        init: starting weights (card, training folder, checkpoints folder or weights file); fine-tuning.
        teacher_logits: logits manifests of the ``train`` datasets (one each), joined by key, for soft/mix.
        eval_data: a labeled dataset manifest; its top-1 is measured each epoch and put in the card.
        resume: kept for older callers; a run always continues from the last checkpoint in ``out/checkpoints``
            when that checkpoint has this run's fingerprint, and is refused (naming what changed) otherwise.
        kind: ``model`` (a student) or ``teacher``.
        stage: the producer stage name recorded in the card.

    Returns:
        The card's manifest path (the same on every rank; rank 0 writes it).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    env = dd.setup(config.device)
    run = None
    try:
        run = _start(env, [Path(p) for p in train], Path(out), config, init, teacher_logits, eval_data, kind)
        if run.finished:
            log.info("%s: this run is complete (its card and final checkpoint); nothing to do", run.out)
            return run.out / mf.MANIFEST_NAME
        for epoch in range(run.state["epoch"], config.epochs):
            _run_epoch(run, epoch)
        return _finish(run, kind, stage)
    finally:
        if run is not None:
            run.lease.release()
        dd.teardown(env)


def _start(env, train, out, config, init, teacher_logits, eval_data, kind) -> Run:
    inputs = load_inputs(train, teacher_logits, config)
    plan = make_plan(inputs, config, env.world)
    _verify(plan, env)
    model, lineage, init_id = _model(config, inputs, env, init)
    eval_manifest = mf.load(eval_data, kind="dataset") if eval_data is not None else None
    lineage += [(eval_manifest, "eval")] if eval_manifest is not None else []
    net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.world > 1 else model
    optimizer, scheduler = _optimizer(model, config, plan)
    body = {"code": CODE_VERSION, "config": config.fingerprint_params(), "kind": kind,
            "train": [m.id for m in inputs.manifests], "logits": [_id(p) for p in inputs.logits],
            "init": init_id, "world": env.world}
    lease = take(out / CHECKPOINTS, {"hash": sha256_json(body), "stage": kind, "code_version": CODE_VERSION,
                                     "params": _flatten(json.loads(json.dumps(body)))}, out)
    run = Run(env, config, inputs, plan, out, model, net, optimizer, scheduler, sha256_json(body), body, lineage,
              eval_manifest, lease)
    run.state = _fresh_state(plan)
    try:
        _maybe_resume(run)
        _check_finished(run)
    except BaseException:
        lease.release()
        raise
    log.info("training %s on %d shard(s), %d sample(s): %d rank(s) x %d step(s)/epoch x %d epoch(s), loss %s",
             config.arch, len(plan.shards), plan.total_samples, env.world, plan.steps_per_epoch, config.epochs,
             config.loss)
    return run


def _model(config: TrainConfig, inputs: TrainInputs, env: dd.DistEnv, init) -> tuple:
    """The model (seeded init, or ``init``'s weights) on the device; the lineage so far; init's identity."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, len(inputs.class_names))
    lineage, init_id = list(inputs.lineage), None
    if init is not None:
        init_card, init_id = load_initial(model, init)
        lineage += [(init_card, "init")] if init_card is not None else []
    model = model.to(env.device)
    if env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, lineage, init_id


def _optimizer(model: torch.nn.Module, config: TrainConfig, plan: DataPlan) -> tuple:
    """SGD with Nesterov momentum, or AdamW; linear warm-up then cosine decay over all steps of the run."""
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.momentum, 0.999),
                                      weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)
    steps = config.epochs * plan.steps_per_epoch
    warmup = round(config.warmup_epochs * plan.steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total_steps=steps, warmup_steps=warmup))


def _id(logits_path: str | None) -> str | None:
    return None if logits_path is None else mf.load(logits_path, kind="logits").id


def _verify(plan: DataPlan, env: dd.DistEnv) -> None:
    """Every rank hashes its share of the shards; any problem anywhere stops every rank before training."""
    problems = verify_shards(list(plan.shards), env.rank, env.world)
    total = dd.all_sum([float(len(problems))], env)[0]
    if problems:
        raise IntegrityError("training shards differ from their manifest: " + "; ".join(problems[:5]) +
                             " (run `kdpipe verify` on the manifest; re-create the damaged shards)")
    if total:
        raise IntegrityError("another rank found training shards that differ from their manifest (see its log)")


def _fresh_state(plan: DataPlan) -> dict:
    return {"step": 0, "epoch": 0, "positions": [0] * plan.streams, "sums": [0.0, 0.0, 0.0, 0.0],
            "failures": [0.0] * len(REASONS), "history": [], "losses": [], "epoch_seconds": 0.0}


def _maybe_resume(run: Run) -> None:
    """Continue from the last checkpoint in ``out/checkpoints`` when it was made by the same run (same
    fingerprint: config, inputs, init, ranks); refuse, naming what changed, when it was not."""
    folder = run.out / CHECKPOINTS
    loaded = ckpt.load_latest(folder)
    if loaded is None:
        return
    if loaded.state["fingerprint"] != run.fingerprint:
        changed = fingerprint_changes(loaded.state.get("fingerprint_body"), run.fingerprint_body)
        raise FingerprintMismatch(
            f"{folder}: holds checkpoints of a run with other inputs or parameters ({changed}); rerun with the "
            f"same ones to resume it, write to a new --out folder, or delete {folder} to start over")
    run.model.load_state_dict(loaded.model, strict=True)
    run.optimizer.load_state_dict(loaded.optimizer)
    run.scheduler.load_state_dict(loaded.scheduler)
    run.state = {k: v for k, v in loaded.state.items() if k not in ("fingerprint", "fingerprint_body")}
    if not run.env.is_main:  # rank 0 carries the run-wide partial sums of the epoch in progress
        run.state["sums"], run.state["failures"] = [0.0] * 4, [0.0] * len(REASONS)
    log.info("resumed from %s at step %d (epoch %d)", loaded.path, run.state["step"], run.state["epoch"])


def _check_finished(run: Run) -> None:
    """A card in ``out`` is this run's when its last checkpoint (same fingerprint, checked on resume) ended the last
    epoch: the run is then complete (a rerun does no work); any other card is refused."""
    if not (run.out / mf.MANIFEST_NAME).exists():
        return
    if run.state["epoch"] < run.config.epochs:
        raise InputError(f"{run.out}: holds a finished run ({mf.MANIFEST_NAME}) that is not this one (no final "
                         "checkpoint with these inputs and parameters); write to a new --out folder")
    run.finished = True


def fingerprint_changes(before: dict | None, now: dict) -> str:
    """``config.lr: 0.05 -> 0.5; train: [...] -> [...]``: the fingerprint fields that differ."""
    if not isinstance(before, dict):
        return "fingerprint differs; the checkpoint predates recorded parameters"
    flat_before, flat_now = _flatten(before), _flatten(json.loads(json.dumps(now)))
    keys = sorted(set(flat_before) | set(flat_now))
    return "; ".join(f"{k}: {flat_before.get(k)!r} -> {flat_now.get(k)!r}" for k in keys
                     if flat_before.get(k) != flat_now.get(k)) or "fingerprint differs"


def _flatten(body: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in body.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _run_epoch(run: Run, epoch: int) -> None:
    steps = run.plan.steps_per_epoch
    start = run.state["step"] - epoch * steps
    started = time.time()
    loader = make_loader(run.plan, epoch, run.env.rank, start, list(run.state["positions"]),
                         pin_memory=run.env.device.type == "cuda")
    run.net.train()
    if run.config.freeze_bn:
        _freeze_batchnorm(run.model)
    done = start
    with Progress(f"train epoch {epoch}", steps, unit="steps", done=start, show=run.env.is_main) as shown:
        for batch in loader:
            _step(run, batch)
            shown.part_done(len(batch["labels"]))
            run.state["positions"][done % run.plan.streams] = batch["position"]
            done += 1
            if run.config.checkpoint_every and run.state["step"] % run.config.checkpoint_every == 0 and done < steps:
                _checkpoint(run)
    if done != steps:
        raise InputError(f"epoch {epoch}: the data stream ended after {done} of {steps} batches on rank "
                         f"{run.env.rank} (too many undecodable samples?); see the failure counts in the log")
    run.state["epoch_seconds"] += time.time() - started
    _end_epoch(run, epoch)


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm layers in eval mode: they normalise with (and keep) their running statistics."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _step(run: Run, batch: dict) -> None:
    env, config = run.env, run.config
    cuda = env.device.type == "cuda"
    images = imaging.normalise(batch["images"].to(env.device, non_blocking=True), config.preprocess)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["labels"].to(env.device, non_blocking=True)
    torch.manual_seed((config.seed * 1_000_003 + run.state["step"] * 10_007 + env.rank) % (2 ** 63))
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
        logits = run.net(images)
    probs = temp = None
    if config.loss != "hard":
        temp = batch["temperature"].to(env.device)
        probs = teacher_distribution(batch["topk_index"].to(env.device), batch["topk_logit"].to(env.device),
                                     batch["lse"].to(env.device), temp, len(run.inputs.class_names),
                                     config.residual)
    loss = distillation_loss(config.loss, logits, labels, probs, temp, config.alpha, config.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    _account(run, batch, logits.detach(), labels, loss.item())


def _account(run: Run, batch: dict, logits: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
    sums, n = run.state["sums"], len(labels)
    known = labels >= 0
    sums[0] += loss * n
    sums[1] += n
    sums[2] += float((logits.argmax(dim=1)[known] == labels[known]).sum())
    sums[3] += float(known.sum())
    for reason, key in batch["failures"]:
        slot = REASONS.index(reason) if reason in REASONS else len(REASONS) - 1
        run.state["failures"][slot] += 1
        log.warning("skipped training sample %s: %s", key, reason)
    run.state["step"] += 1
    if run.env.is_main and run.state["step"] % run.config.log_every == 0:
        run.state["losses"].append([run.state["step"], loss])


def _gather_sums(run: Run) -> None:
    """Make rank 0 hold the run-wide partial sums (other ranks zero), so a checkpoint carries them."""
    values = dd.all_sum(run.state["sums"] + run.state["failures"], run.env)
    if not run.env.is_main:
        values = [0.0] * len(values)
    run.state["sums"], run.state["failures"] = values[:4], values[4:]


def _checkpoint(run: Run) -> None:
    _gather_sums(run)
    if run.env.is_main:
        ckpt.save_checkpoint(run.out / CHECKPOINTS, run.state["step"], run.model.state_dict(), run.optimizer,
                             run.scheduler, {**run.state, "fingerprint": run.fingerprint,
                                                             "fingerprint_body": run.fingerprint_body})
    dd.barrier(run.env)


def _end_epoch(run: Run, epoch: int) -> None:
    _gather_sums(run)
    loss_sum, n, correct, labeled = run.state["sums"]
    record = {"epoch": epoch, "step": run.state["step"], "train_loss": loss_sum / max(n, 1),
              "train_top1": correct / labeled if labeled else None, "samples": int(n),
              "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(run.state["epoch_seconds"], 3),
              "failures": {r: int(c) for r, c in zip(REASONS, run.state["failures"]) if c}}
    if run.eval_data is not None and run.env.is_main:
        result = accuracy(run.model, run.eval_data, run.config.preprocess, device=run.env.device)
        record["eval_top1"], record["eval_samples"] = result["top1"], result["samples"]
    run.state["sums"], run.state["epoch_seconds"] = [0.0] * 4, 0.0
    run.state["failures"] = [0.0] * len(REASONS)
    run.state["positions"] = [0] * run.plan.streams
    run.state["epoch"] = epoch + 1
    if run.env.is_main:
        run.state["history"].append(record)
        write_metrics(run.out, run.state["history"])
        log.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if k != "failures"})
    _checkpoint(run)


def _finish(run: Run, kind: str, stage: str) -> Path:
    target = run.out / mf.MANIFEST_NAME
    if run.env.is_main:
        history = run.state["history"]
        plot_losses(run.out, run.state["losses"], history, f"{run.config.arch} ({run.config.loss} loss)")
        last = history[-1] if history else {}
        metrics = {k: last[k] for k in ("train_loss", "train_top1", "eval_top1", "eval_samples") if k in last}
        if run.eval_data is not None:
            metrics["top1"], metrics["eval_manifest_id"] = last.get("eval_top1"), run.eval_data.id
        failures: dict[str, int] = {}
        for record in history:
            for reason, count in record["failures"].items():
                failures[reason] = failures.get(reason, 0) + count
        extra = {"training": {**run.config.fingerprint_params(), "steps": run.state["step"],
                              "steps_per_epoch": run.plan.steps_per_epoch, "world_size": run.env.world,
                              "samples_per_epoch": run.plan.total_samples, "skipped_samples": failures}}
        inputs = [mf.input_ref(m, run.out, role) for m, role in run.lineage]
        write_card(run.out, run.model, arch=run.config.arch, class_names=list(run.inputs.class_names),
                   preprocess=run.config.preprocess, stage=stage, inputs=inputs, metrics=metrics, extra=extra,
                   kind=kind)
    dd.barrier(run.env)
    return target

"""Student (and teacher) training: webdataset streaming, hard / soft / mix losses, DDP, exact resume.

Entry point: ``stages.train.loop.train(train, out, config, ...)`` with a ``stages.train.config.TrainConfig``.
Modules: ``data`` (the shard stream), ``augment`` (explicit crop-box + flip views), ``losses``,
``distributed`` (torchrun / SLURM ranks), ``checkpoint`` (safetensors + JSON, atomic), ``inputs`` (manifests,
joined teacher logits, initial weights), ``evaluation`` (top-1 on a labeled manifest), ``outputs``
(metrics.jsonl, loss curve).
"""

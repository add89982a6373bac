"""Student and teacher training: webdataset streaming, hard / soft / mix losses, DDP, exact resume.

Entry points: ``stages.train.loop.train(train, out, config, ...)`` with a ``stages.train.config.TrainConfig``
(every training option's default and help), and ``stages.train.teacher.train_teacher`` (hard labels -> a teacher
card). Modules: ``data`` (the shard stream), ``augment`` (explicit crop-box + flip views), ``losses``,
``distributed`` (torchrun / SLURM ranks), ``checkpoint`` (safetensors + JSON, atomic), ``inputs`` (manifests,
joined teacher logits, initial weights), ``outputs`` (metrics.jsonl, loss curve). Top-1 on a labeled manifest
is ``stages.models.evaluation``.
"""

"""Recorded multi-view augmentation (a common package: logits, reshard and train all use it; docs/views.md).

- ``spec``: ``AugSpec`` and ``parse_aug`` ("rrc:0.35-1,flip:0.5,mixup:0.2"), the manifest's ``views`` record.
- ``render``: order-free view sampling per key, exact rendering of a view (crop box, flip, mixup partner),
  the per-epoch view choice of the trainer, the random-resized-crop rule shared with training augmentation.

The Parquet row layout of multi-view logits is a contract of the logits artifact: ``stages.artifacts.views``.
"""

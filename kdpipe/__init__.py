"""kdpipe's public Python API: stored teacher logits and resharded soft targets in your own training loop.

    from kdpipe import open_logits, soft_targets, wds_targets, kd_loss

- ``open_logits(M)``: a logits artifact: ``batches(format="arrow"|"numpy"|"torch")``, ``join(table)`` by key,
  ``soft_targets(batch, temperature=T')``.
- ``soft_targets(rows, temperature=None, dense=True, policy="exact")``: teacher distributions at any T' from
  stored top-K rows (Arrow, DuckDB/Polars/pandas results, a sample's ``json``): dense (N, C) or
  ``Sparse(indices, probs, residual)``.
- ``wds_targets(...)``: a webdataset stage, ``wds.WebDataset(urls).decode("pil").compose(wds_targets())``
  yields ``(image, hard_label, soft_targets)``; ``shard_urls(M)`` lists a dataset manifest's shards.
- ``kd_loss(student_logits, targets, T, alpha, labels=None)``: kdpipe's training loss.

Importing kdpipe loads neither torch nor webdataset (``kd_loss`` and ``format="torch"`` import torch when
called). This package is the entry layer's Python face: a thin layer over ``stages.artifacts`` readers and
``stages.train.losses``. The guide, with examples that the tests run: docs/api.md.
"""

from kdpipe.logits import Logits, open_logits
from kdpipe.loss import kd_loss
from kdpipe.targets import soft_targets
from kdpipe.wds import WdsTargets, shard_urls, wds_targets
from stages.artifacts.targets import Sparse

__all__ = ["Logits", "Sparse", "WdsTargets", "kd_loss", "open_logits", "shard_urls", "soft_targets",
           "wds_targets"]

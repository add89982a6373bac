"""The evaluate stage: a model on a dataset (top-1/top-5, per class, confusion, teacher agreement), or a selection's
pseudo-label precision against hidden labels.

- ``stage``: ``evaluate`` (computes the model's logits with ``stages.logits.stage.compute_logits``, the one
  declared cross-stage import) and ``precision_report``.
- ``metrics``: streaming accumulators. ``report``: JSON, Markdown, confusion CSV/PNG, per-class plot.
- ``options``: ``EvaluateOptions``.
"""

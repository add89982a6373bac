"""The summary stage: comparison tables and report folders at the end of a chain (the demo's) or of a sweep.

- ``stage``: ``publish(run_dir, out, rows, ...)`` and ``table(summary)``; ``read_report`` of a finished evaluation.
- ``sweep``: ``publish_sweep(out, rows, ...)``: every evaluation of every variant, mean and spread over seeds,
  per-class accuracy, confusion matrices side by side, training curves overlaid (``kdpipe sweep``).
"""

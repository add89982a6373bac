"""The summary stage: the comparison table and report folder at the end of a chain (the demo's).

- ``stage``: ``publish(run_dir, out, rows, ...)`` and ``table(summary)``.
"""

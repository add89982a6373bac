"""kdpipe's framework core: manifests, paths, atomic commits, parts and receipts, tasks, planning, signals,
verify, config, options, errors, hashing, logging; plus ONE entry subpackage, ``pipeline.cli`` (the command
line, run, submit, status, templates, configs), the only code that imports stages.

The core imports nothing from ``stages`` and nothing from ``pipeline.cli`` (``tests/test_layout.py``).
"""

__version__ = "0.1.0"

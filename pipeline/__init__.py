"""kdpipe's framework: CLI, config, manifests, atomic part commits, task planning, cluster submission, status.

The core modules (errors, hashing, atomic, paths, manifest, parts, planning, log) import nothing from
``stages``; only the entry modules (``cli``, ``commands``, ``run``, ``submit``) do.
"""

__version__ = "0.1.0"

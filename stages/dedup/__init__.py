"""The dedup stage: faiss contamination and near-duplicate search on teacher embeddings -> an exclusion artifact.

- ``stage``: ``dedup(query, out, reference=..., threshold=...)``; the artifact's contract is
  ``stages.artifacts.exclusion``. ``options``: ``DedupOptions``.
"""

"""The index stage: existing WebDataset tars (img2dataset, LAION/DataComp style) -> a dataset manifest in place.

- ``stage``: ``index(sources, out, ...)``: one part per shard (a small JSON record), array tasks, finalize.
- ``sources``: expanding paths, globs, ``{a..b}`` patterns, list files and URLs into shard locations.
- ``scan``: one streaming pass over a shard: bytes, sha256, samples, image extension, labels, stats check.
- ``options``: ``IndexOptions``, the stage's defaults.
"""

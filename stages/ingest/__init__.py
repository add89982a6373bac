"""The ingest stage: an image folder, a file list or the bundled digits -> WebDataset shards + a dataset manifest.

- ``stage``: ``ingest(src, out, ...)``: shards planned by count and bytes, one part per shard, splits.
- ``sources``: discovering items (labeled folder, flat folder, file list, ``digits``) and their keys.
- ``base``: ``ingest_grown``: a grown dataset = a base dataset's shards (checked, unchanged) + new shards.
- ``drift``: what each part read (``OUT/_source``) and the refusal of a rerun over a changed source.
- ``options``: ``IngestOptions``, the stage's defaults.
"""

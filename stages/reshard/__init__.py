"""The reshard stage: the selected samples -> WebDataset training shards (image, ``cls``, soft targets in ``json``).

- ``stage``: ``reshard(selection, out, ...)``: one part per output shard, source shards streamed in waves.
- ``plan``: pure planning: output shard = run of source shards; waves; sample keys; seeded shuffle.
- ``options``: ``ReshardOptions``.
"""

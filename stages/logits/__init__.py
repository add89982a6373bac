"""The logits stage: a frozen classifier over dataset shards -> top-K logits in Parquet, one part per shard.

| module | role (clip-retrieval's dataflow roles) |
| --- | --- |
| ``stage`` | runner: input checks, fingerprint, one array task over its shards, finalize (``compute_logits``) |
| ``data`` | reader: shards decoded in DataLoader workers; ``PartFeed`` restores shard order |
| ``inference`` | mapper: ``Engine`` (device, bf16/channels_last/compile, fixed batch, top-K + lse on device) |
| ``assemble`` | one part: compute batches over shard positions, failures by reason, retry re-checks |
| ``write`` | writer: the part's Parquet table and file metadata |
| ``reuse`` | ``--reuse``: parts of unchanged shards rewritten byte-identically without the teacher |
| ``check_views`` | ``kdpipe check_views``: the teacher re-run on rebuilt stored views |
| ``options``, ``check_options`` | the stage's defaults |
"""

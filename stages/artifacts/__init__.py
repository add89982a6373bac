"""Artifact contracts: the formats and readers that more than one stage reads or writes.

A stage package imports these, never another stage package. Nothing here runs a model or a stage.

| module | contract |
| --- | --- |
| ``logits_format`` | the logits Parquet schema, file metadata, and the maths of stored soft targets |
| ``logits_reader`` | the one logits reader: sha256 + metadata checks, row checks, streamed batches |
| ``views`` | the row layout of multi-view logits (view columns, per-key groups, dense targets per view) |
| ``selection`` | the selection Parquet contract, its verify check, the streaming ``SelectionRows`` reader |
| ``exclusion`` | the exclusion artifact (dedup -> select): reasons, verify check, loading its keys |
| ``lineage`` | selection -> logits -> dataset through manifest inputs, with id checks |
| ``cards`` | teacher / model cards: safetensors weights + manifest; loading a classifier from one |
| ``parquet`` | deterministic Parquet writing; opening a Parquet file or raising a named error |
| ``reports`` | figures, PNG bytes, publishing a report folder with its ``report`` manifest |
| ``checks`` | ``kdpipe verify``'s content checks per manifest kind |
| ``dataset_check`` | verify's dataset check: shard sample counts, a key twice in a shard or in two shards |
| ``targets`` | soft targets at any temperature from top-K storage (sparse / dense, residual policy) |
| ``sidecars`` | files beside a manifest for other tools (HF dataset card, timm ``_info.json``) and their check |
| ``describe`` | ``kdpipe show``: an artifact in words |
| ``export`` | ``kdpipe export``: logits / selection as one CSV, JSON or Parquet file (timm's columns) |
"""

"""The ingest stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option


@dataclass(frozen=True)
class IngestOptions:
    """How a source becomes shards."""

    shard_size: int = option(1000, "samples per shard at most")
    shard_bytes: int = option(1 << 30, "bytes per shard, about (a shard rolls over before it would exceed it)")
    split: str | None = option(None, "deterministic stratified subsets, e.g. labeled=3/class,test=500,unlabeled=rest "
                                     "(N/class:first: the first N of each class in source order, no seed)", type=str)
    seed: int = option(0, "seed of --split")
    base: Path | None = option(None, "grow this dataset manifest: its shards (unchanged, same order), then SRC's",
                               type=Path)

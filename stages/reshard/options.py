"""The reshard stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option


@dataclass(frozen=True)
class ReshardOptions:
    """How selected samples are written as training shards."""

    data: Path | None = option(None, "source dataset manifest (default: the one the selection's logits were made "
                                     "from)", type=Path)
    shard_size: int = option(1000, "samples per output shard, about")
    shard_bytes: int = option(256 << 20, "bytes per output shard, about")
    seed: int = option(0, "seed of the shuffle within each output shard")
    decode_check: bool = option(False, "fully decode every selected image (default: check its signature only)")
    max_rows: int = option(1_000_000, "selection rows held in memory at once (memory bound)")
    keep: str = option("", "other members of each selected sample to carry through, comma-separated (e.g. "
                           "txt,json: captions, img2dataset metadata); one that would collide with reshard's own "
                           "members (cls, json, the image) is written as src.<ext>")

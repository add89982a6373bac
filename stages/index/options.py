"""The index stage's options: one place for their defaults and help (the CLI and configs are made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.options import option


@dataclass(frozen=True)
class IndexOptions:
    """How existing shards are indexed."""

    label_from: str | None = option(None, "where a sample's label is: 'cls' (the cls member) or 'json:FIELD' "
                                          "(a field of the json member; a class id or name); default: unlabeled",
                                    type=str)
    classes: Path | None = option(None, "text file of class names, one a line (needed with --label-from)",
                                  type=Path)
    check_stats: bool = option(True, "cross-check img2dataset's NNNNN_stats.json 'successes' when present",
                               flag="--no-check-stats")

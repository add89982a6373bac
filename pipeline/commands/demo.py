"""``kdpipe demo``: the whole chain on the bundled digits, on the CPU, in minutes."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("kdpipe")
DEMO_SPLIT = "labeled=3/class,test=500,unlabeled=rest"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole method on the bundled digits (CPU, minutes)")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.ingest import ingest

    manifests = ingest("digits", args.out / "data", shard_size=200, split=DEMO_SPLIT, seed=0)
    for name, path in manifests.items():
        log.info("demo data %s: %s", name, path)
    return 0

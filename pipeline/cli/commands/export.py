"""``kdpipe export M --output FILE``: a logits or selection artifact as one flat CSV, JSON or Parquet file, with
the column conventions of timm's ``inference.py`` (``filename``, ``index``/``label``, ``prob``/``logit``)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.options import add_options, from_args
from stages.artifacts.export import ExportOptions

log = logging.getLogger("kdpipe")


def register(sub) -> None:
    p = sub.add_parser("export", help="a logits or selection artifact as one CSV, JSON or Parquet file (timm-style)")
    p.add_argument("manifest", help="logits or selection manifest (file or folder)")
    p.add_argument("--output", required=True, type=Path, help="the file to write (replaced if it exists)")
    add_options(p, ExportOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from stages.artifacts.export import export

    rows = export(args.manifest, args.output, from_args(ExportOptions, args))
    log.info("export: %d rows -> %s", rows, args.output)
    return 0

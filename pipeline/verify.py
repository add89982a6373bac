"""``kdpipe verify``: re-hash every file a manifest lists and check sizes, counts and schema; name part files in
the folder that the manifest does not list.

Kind-specific content checks (e.g. logits indices in range) are passed in by the command layer, so this
core module knows nothing of stages.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import KdpipeError
from pipeline.hashing import sha256_file

log = logging.getLogger(__name__)
ContentCheck = Callable[[mf.Manifest, dict, Path], list[str]]
_PART = re.compile(r"part-\d+\.[A-Za-z0-9.]+")


def parquet_rows(path: Path) -> int:
    """Row count from a Parquet footer (raises on a cut or garbage file)."""
    return pq.ParquetFile(path).metadata.num_rows


def verify(path: str | Path, checks: dict[str, ContentCheck] | None = None) -> list[str]:
    """Return every problem found in the artifact of manifest ``path`` (empty when it is intact)."""
    try:
        manifest = mf.load(path)
    except KdpipeError as exc:
        return [str(exc)]
    problems = []
    for entry in manifest.files:
        problems += _verify_file(manifest, entry, (checks or {}).get(manifest.kind))
    return problems + stray_parts(manifest)


def stray_parts(manifest: mf.Manifest) -> list[str]:
    """Part files in the manifest's folder that it does not list (a second writer's, e.g. another shard size):
    a reader that globs the folder would take them for the artifact's."""
    try:
        listed = {Path(w).resolve() for w in map(manifest.file_path, manifest.files) if not isinstance(w, str)}
        found = sorted(p for p in manifest.folder.iterdir() if _PART.fullmatch(p.name) and p.is_file())
    except OSError:  # unreadable folder or entry: the per-file checks name it
        return []
    return [f"{p}: a part file the manifest does not list (another writer's?); delete it, or rerun the stage in "
            "a new folder" for p in found if p.resolve() not in listed]


def _verify_file(manifest: mf.Manifest, entry: dict, check: ContentCheck | None) -> list[str]:
    where = manifest.file_path(entry)
    if isinstance(where, str):
        return []  # remote URLs are verified by the stage that streams them
    if not where.is_file():
        return [f"{where}: missing"]
    if where.stat().st_size != entry["bytes"]:
        return [f"{where}: {where.stat().st_size} bytes, manifest says {entry['bytes']}"]
    if sha256_file(where) != entry["sha256"]:
        return [f"{where}: sha256 differs from the manifest (file changed or damaged)"]
    problems = []
    if where.suffix == ".parquet" and "rows" in entry:
        problems += _count_problem(where, lambda: parquet_rows(where), entry["rows"], "rows")
    if check is not None:
        problems += check(manifest, entry, where)
    return problems


def _count_problem(where: Path, count: Callable[[], int], expected: int, what: str) -> list[str]:
    try:
        found = count()
    except Exception as exc:  # a damaged file may raise anything from its reader
        return [f"{where}: unreadable ({type(exc).__name__}: {exc})"]
    return [] if found == expected else [f"{where}: {found} {what}, manifest says {expected}"]


def count_check(counter: Callable[[Path], int], key: str, what: str) -> ContentCheck:
    """A content check comparing ``counter(file)`` with the entry's ``key`` (e.g. tar samples)."""
    def check(manifest: mf.Manifest, entry: dict, where: Path) -> list[str]:
        return _count_problem(where, lambda: counter(where), entry[key], what) if key in entry else []
    return check

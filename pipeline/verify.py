"""``kdpipe verify``: re-hash every file a manifest lists and check sizes, counts and schema; name part files in
the folder that the manifest does not list.

Kind-specific content checks (e.g. logits indices in range) are passed in by the command layer, so this
core module knows nothing of stages. External entries (``kdpipe index``: absolute paths, ``s3://``, ``gs://``,
``http(s)://``) are streamed through ``pipeline.storage`` and re-hashed like local files; a file that could not
be read is a problem ("NOT verified"), never intact. ``jobs`` files are checked at once (threads: hashing and
I/O release the GIL).
"""

from __future__ import annotations

import logging
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import KdpipeError
from pipeline.hashing import sha256_file
from pipeline.storage import RemotePath, filesystem, open_read, scheme_of, sha256_of

log = logging.getLogger(__name__)
ContentCheck = Callable[[mf.Manifest, dict, Path], list[str]]
_PART = re.compile(r"part-\d+(\.[A-Za-z0-9.]+)")


def parquet_rows(path: Path) -> int:
    """Row count from a Parquet footer (raises on a cut or garbage file)."""
    return pq.ParquetFile(path).metadata.num_rows


def verify(path: str | Path, checks: dict[str, ContentCheck] | None = None, jobs: int = 1) -> list[str]:
    """Return every problem found in the artifact of manifest ``path`` (empty when it is intact)."""
    try:
        manifest = mf.load(path, remote_ok=True)
    except KdpipeError as exc:
        return [str(exc)]
    check = (checks or {}).get(manifest.kind)
    work = lambda entry: _verify_file(manifest, entry, check)  # noqa: E731
    if jobs <= 1:
        results = [work(entry) for entry in manifest.files]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(work, manifest.files))
    return [problem for found in results for problem in found] + stray_parts(manifest)


def stray_parts(manifest: mf.Manifest) -> list[str]:
    """Part files in the manifest's folder that it does not list (a second writer's, e.g. another shard size):
    a reader that globs the folder would take them for the artifact's. Only files of the listed parts' kind
    (``part-N.parquet``, ``.tar``...) count: an ``index`` folder's own records are not its files."""
    try:
        paths = [w for w in map(manifest.file_path, manifest.files) if not isinstance(w, str)]
        listed = {(w if isinstance(w, RemotePath) else Path(w)).resolve() for w in paths}
        kinds = {_part_kind(w.name) for w in paths} - {None}
        found = sorted((p for p in _files(manifest.folder) if _part_kind(p.name) in kinds), key=str)
    except OSError:  # unreadable folder or entry: the per-file checks name it
        return []
    return [f"{p}: a part file the manifest does not list (another writer's?); delete it, or rerun the stage in "
            "a new folder" for p in found if p.resolve() not in listed]


def _part_kind(name: str) -> str | None:
    """``.parquet`` for ``part-000001.parquet``; None for a name that is not a part's."""
    match = _PART.fullmatch(name)
    return match.group(1) if match else None


def _files(folder) -> list:
    """The files of a local folder or of a prefix in object storage (one listing call, no request per file)."""
    if isinstance(folder, RemotePath):
        entries = filesystem(scheme_of(folder.url)).ls(folder.url, detail=True)
        return [folder / e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
    return [p for p in folder.iterdir() if p.is_file()]


def _verify_file(manifest: mf.Manifest, entry: dict, check: ContentCheck | None) -> list[str]:
    where = manifest.file_path(entry)
    if isinstance(where, RemotePath):
        return _verify_object(manifest, entry, where, check)
    if isinstance(where, str) or manifest.is_external(entry):
        return _verify_streamed(manifest, entry, where, check)
    return _verify_local(manifest, entry, where, check)


def _verify_local(manifest: mf.Manifest, entry: dict, where: Path, check: ContentCheck | None) -> list[str]:
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


def _verify_streamed(manifest: mf.Manifest, entry: dict, where: Path | str,
                     check: ContentCheck | None) -> list[str]:
    """An external or remote file: streamed and re-hashed; unreadable means NOT verified, a problem."""
    try:
        digest, size = sha256_of(where)
    except (OSError, KdpipeError) as exc:
        return [f"{where}: could not be read, so it is NOT verified ({exc})"]
    if size != entry["bytes"]:
        return [f"{where}: {size} bytes, manifest says {entry['bytes']}"]
    if digest != entry["sha256"]:
        return [f"{where}: sha256 differs from the manifest (object changed or damaged)"]
    return check(manifest, entry, where) if check is not None else []


def _verify_object(manifest: mf.Manifest, entry: dict, where: RemotePath, check: ContentCheck | None) -> list[str]:
    """A part of an artifact in object storage: fetched once into a local temp file (hashed as it comes), then
    checked like a local part; problems name the object."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-verify-") as tmp:
        local = Path(tmp) / where.name
        try:
            with open_read(str(where)) as stream, open(local, "wb") as out:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    out.write(chunk)
        except (OSError, KdpipeError) as exc:
            return [f"{where}: could not be read, so it is NOT verified ({exc})"]
        problems = _verify_local(manifest, entry, local, check)
    return [p.replace(str(local), str(where)) for p in problems]


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

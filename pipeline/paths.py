"""Safety of manifest file entries: relative paths that stay in their folder, or declared external entries.

A manifest is handed between teams; nothing in it may make a reader open a file outside the manifest's
folder or run a command (webdataset's ``pipe:`` URLs run a shell). The one exception is declared: a
``dataset`` manifest made by ``kdpipe index`` lists shards where they already live, each entry marked
``"external": true`` with an absolute path, a ``file://`` URL or a URL of ``EXTERNAL_SCHEMES``. No stage ever
writes to an external entry, and every reader re-hashes it while it streams it.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pipeline.errors import ManifestError, PathEscapeError

ALLOWED_URL_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")
EXTERNAL_SCHEMES = ("file", "http", "https", "s3", "gs", "gcs")
EXTERNAL_KIND, EXTERNAL_STAGE = "dataset", "index"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def is_url(entry: str) -> bool:
    """True when ``entry`` carries a URL scheme (``s3://...``, ``pipe:...``)."""
    match = _SCHEME.match(entry)
    return bool(match) and len(match.group(1)) > 1  # a Windows drive letter is not a scheme


def check_entry(entry: str, where: str = "manifest") -> None:
    """Raise ``PathEscapeError`` unless ``entry`` is a safe relative path or an allow-listed URL."""
    if not isinstance(entry, str) or not entry:
        raise PathEscapeError(f"{where}: file path {entry!r} is empty or not a string")
    if "\x00" in entry:
        raise PathEscapeError(f"{where}: file path {entry!r} contains a NUL byte")
    if is_url(entry):
        scheme = _SCHEME.match(entry).group(1).lower()
        if scheme not in ALLOWED_URL_SCHEMES or not entry.lower().startswith(f"{scheme}://"):
            raise PathEscapeError(f"{where}: URL {entry!r} has a refused scheme {scheme!r} "
                                  f"(allowed: {', '.join(ALLOWED_URL_SCHEMES)})")
        return
    posix = PurePosixPath(entry)
    if posix.is_absolute() or entry.startswith("\\") or "\\" in entry:
        raise PathEscapeError(f"{where}: file path {entry!r} is absolute or uses backslashes; "
                              "paths must be relative to the manifest's folder (to point at shards where they live, "
                              "run `kdpipe index`)")
    if any(part == ".." for part in posix.parts):
        raise PathEscapeError(f"{where}: file path {entry!r} contains '..' and could leave the manifest's folder")


def resolve_entry(base: Path, entry: str, where: str = "manifest") -> Path | str:
    """Return the local path of a relative ``entry`` under ``base`` (symlinks must stay inside), or the URL."""
    check_entry(entry, where)
    if is_url(entry):
        return entry
    root = base.resolve()
    try:
        target = (base / entry).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13, ELOOP after
        raise ManifestError(f"{where}: file path {entry!r} cannot be resolved ({exc}); it is a symlink loop or "
                            "an unreadable link: replace it with the file the manifest lists") from None
    if target != root and root not in target.parents:
        raise PathEscapeError(f"{where}: file path {entry!r} resolves to {target}, outside {root} "
                              "(a symlink leaves the manifest's folder)")
    return base / entry


def check_file(entry: dict, kind: str, stage: str | None, where: str = "manifest") -> None:
    """Check one ``files`` entry of a ``kind`` manifest made by ``stage``: relative and inside, or external.

    Only a ``dataset`` manifest made by ``index`` holds external entries; any other manifest lists relative
    paths only (a URL there must be declared external, i.e. indexed).
    """
    path = entry.get("path")
    if not entry.get("external"):
        check_entry(path, where)
        if is_url(path):
            raise PathEscapeError(f"{where}: file {path!r} is a URL but not a declared external entry; "
                                  "point at shards where they live with `kdpipe index`")
        return
    if kind != EXTERNAL_KIND or stage != EXTERNAL_STAGE:
        raise PathEscapeError(f"{where}: file {path!r} is external, but only a dataset manifest made by "
                              f"`kdpipe index` may list external entries (this is a {kind} made by {stage})")
    check_external(path, where)


def check_external(path: str, where: str = "manifest") -> None:
    """An external location: an absolute path, ``file:///...``, or a URL of ``EXTERNAL_SCHEMES``."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PathEscapeError(f"{where}: external file {path!r} is empty, not a string or holds a NUL byte")
    if not is_url(path):
        if not PurePosixPath(path).is_absolute():
            raise PathEscapeError(f"{where}: external file {path!r} must be an absolute path or a URL")
        return
    scheme = _SCHEME.match(path).group(1).lower()
    if scheme not in EXTERNAL_SCHEMES or not path.lower().startswith(f"{scheme}://"):
        raise PathEscapeError(f"{where}: external file {path!r} has a refused scheme {scheme!r} "
                              f"(allowed: {', '.join(s + '://' for s in EXTERNAL_SCHEMES)})")


def resolve_file(base: Path, entry: dict, where: str = "manifest") -> Path | str:
    """Where one ``files`` entry is: a local ``Path`` (inside ``base``, or external) or a remote URL string."""
    path = entry["path"]
    if not entry.get("external"):
        return resolve_entry(base, path, where)
    check_external(path, where)
    if path.lower().startswith("file://"):
        return Path(path[len("file://"):])
    return path if is_url(path) else Path(path)

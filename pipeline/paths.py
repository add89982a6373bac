"""Safety of manifest file entries: relative paths that stay in their folder, or allow-listed URLs.

A manifest is handed between teams; nothing in it may make a reader open a file outside the manifest's
folder or run a command (webdataset's ``pipe:`` URLs run a shell).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pipeline.errors import ManifestError, PathEscapeError

ALLOWED_URL_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")
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
                              "paths must be relative to the manifest's folder")
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

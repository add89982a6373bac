"""Atomic file publication: temp name in the target folder, fsync, validate, rename, fsync the folder.

No reader ever sees a half-written file: a file is either absent or complete. Temp names start with
``.tmp-`` so that a later run can find and remove the leftovers of a killed one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from pipeline.signals import fault_point

TEMP_PREFIX = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """Return a unique temp path in ``final``'s folder (same filesystem, so rename is atomic).

    The name records the writer's host and pid so that cleanup removes only temps of dead writers.
    """
    return final.parent / f"{TEMP_PREFIX}{final.name}~{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}"


def fsync_file(path: Path) -> None:
    """Flush a written file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only after this)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced (not yet published). On error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        fsync_file(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a buffered write's ENOSPC names no file
            exc.filename = str(final)
        raise


def publish(tmp: Path, final: Path, *, exclusive: bool = False) -> None:
    """Rename a fsynced temp file onto ``final`` and fsync the folder.

    Args:
        tmp: the staged file (same folder as ``final``).
        final: the published name.
        exclusive: create-only; raise ``FileExistsError`` (temp removed) if ``final`` already exists.
    """
    try:
        if exclusive:
            os.link(tmp, final)
            tmp.unlink()
        else:
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_atomic(final: Path, data: bytes, *, exclusive: bool = False,
                 validate: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to ``final`` atomically (optionally create-only, optionally validated before publish)."""
    with staged(final) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    fault_point("atomic.staged")
    if validate is not None:
        try:
            validate(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    publish(tmp, final, exclusive=exclusive)


def _writer_gone(name: str, max_age_s: float, mtime: float) -> bool:
    """True when a temp's writer is a dead process on this host, or the temp is older than ``max_age_s``."""
    if time.time() - mtime > max_age_s:
        return True
    try:
        _, host, pid, _ = name.rsplit("~", 3)
    except ValueError:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return int(pid) == os.getpid()


def remove_stale_temps(folder: Path, max_age_s: float = 3600.0) -> int:
    """Remove temp files left by killed writers in ``folder``; return how many were removed.

    A temp whose writer is alive on this host is kept (another task may be writing it), unless it is older
    than ``max_age_s``.
    """
    removed = 0
    if not Path(folder).is_dir():
        return 0
    for entry in os.scandir(folder):
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        if _writer_gone(entry.name, max_age_s, entry.stat(follow_symlinks=False).st_mtime):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed

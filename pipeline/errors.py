"""Named errors of kdpipe. Every message names the file and the key at fault and says what to do."""

from __future__ import annotations

import errno


class KdpipeError(Exception):
    """Base of every error kdpipe raises on purpose; the CLI prints its message and exits 2."""


class ManifestError(KdpipeError):
    """A manifest is missing, malformed, fails its schema, or its id does not match its content."""


class PathEscapeError(ManifestError):
    """A manifest file entry is absolute, contains '..', a NUL byte, a refused URL scheme, or leaves its folder."""


class IntegrityError(KdpipeError):
    """A file's size, sha256 or row count differs from what its manifest or receipt says."""


class FingerprintMismatch(KdpipeError):
    """An output folder holds parts made with other parameters; parts are never mixed."""


class InputError(KdpipeError):
    """A user-given input (source folder, weights, option) is unusable."""


class PartFailed(KdpipeError):
    """One part could not be produced (e.g. a truncated shard); other parts go on."""

    def __init__(self, message: str, reason: str = "part_failed"):
        super().__init__(message)
        self.reason = reason


class OutputError(KdpipeError):
    """A file could not be written or opened for a reason the user can fix: a read-only filesystem, no
    permission, no space left, a symlink loop. The message names the file, the cause and what to do."""


_OS_ADVICE = {
    errno.EROFS: "the filesystem is read-only: give --out a folder on a writable filesystem",
    errno.EACCES: "permission denied: fix the permissions of this file or folder (for an output: give --out a "
                  "folder you can write to)",
    errno.EPERM: "operation not permitted: fix the permissions of this file or folder (for an output: give --out a "
                 "folder you can write to)",
    errno.ENOSPC: "no space left on the device: free space (or give --out another disk), then rerun; "
                  "nothing half-written was published and committed parts are kept",
    errno.EDQUOT: "disk quota exceeded: free space or raise the quota, then rerun; nothing half-written was "
                  "published and committed parts are kept",
    errno.EFBIG: "file too large for this filesystem: give --out another filesystem or use smaller shards",
    errno.ELOOP: "a symlink loop: replace the link with the file or folder it should point at",
}
STOP_TASK_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # every later part would fail the same way


def named_os_error(exc: OSError, where: object = None) -> OutputError | None:
    """An ``OutputError`` naming the file (``where``, else the error's own file name), the cause and what to do,
    for an ``OSError`` a user can fix; None for other errors (a disk failure such as EIO is not the user's)."""
    advice = _OS_ADVICE.get(getattr(exc, "errno", None))
    if advice is None:
        return None
    where = where if where is not None else exc.filename if exc.filename is not None else "(a file)"
    code = errno.errorcode.get(exc.errno, str(exc.errno))
    return OutputError(f"{where}: {exc.strerror or exc} ({code}); {advice}")


class StorageError(InputError):
    """A location cannot be used: a refused scheme (``pipe:``), a missing fsspec backend, or an unreadable object."""

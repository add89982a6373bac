"""Named errors of kdpipe. Every message names the file and the key at fault and says what to do."""


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


class StorageError(InputError):
    """A location cannot be used: a refused scheme (``pipe:``), a missing fsspec backend, or an unreadable object."""

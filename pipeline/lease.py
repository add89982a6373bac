"""One writer per output: a lease on an output folder, taken by every writer before it writes anything.

A writer holds the lease with its fingerprint (``pipeline.parts.fingerprint``: stage, code version, params,
hash). Writers with the same fingerprint share it, so array tasks, duplicated submissions and a requeued task
cooperate (they skip committed parts; one commit of a part, and of the manifest, wins). A writer with another
fingerprint is refused with ``FingerprintMismatch`` before any work, naming the folder, the holder (host, pid,
since when) and every parameter that differs. Once the writers are gone, the receipts they left refuse other
parameters (``PartStore.check_fingerprint``); the lease covers the time before the first receipt exists.

Local folders (``LocalLease``): OS lock files in a lock folder (a stage's ``_parts/``). ``_lease-<hash12>.lock``
holds, as JSON, the fingerprint and the first holder's host, pid and start time; every writer with that
fingerprint keeps a shared ``flock`` on it while it writes. ``_lease.lock`` serialises taking and giving back.
A file that nobody has locked is stale (its writers died: the kernel drops a killed process's locks) and is
removed by the next writer, so a SIGKILLed or requeued task never blocks the folder. ``flock`` works across
hosts on NFSv4 and Lustre (``flock`` mount option); on a filesystem without working locks, the per-part check
in ``PartStore`` (a receipt of another fingerprint is never overwritten) is what remains.

Object storage (not implemented; ``take`` refuses a URL): the same contract with a lease object
``<prefix>/_parts/_lease.json`` written create-only (``If-None-Match: *``) holding the fingerprint, the holder
and an expiry; the holder renews it (conditional put on its ETag) well before the expiry; a writer with the same
fingerprint joins; one with another fingerprint is refused while the lease is unexpired, and takes it over
(conditional put on the stale ETag) once it has expired, which is how a requeued task gets a dead task's lease.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Protocol

from pipeline.errors import FingerprintMismatch, InputError, named_os_error

log = logging.getLogger(__name__)
MUTEX = "_lease.lock"
PREFIX = "_lease-"


class Lease(Protocol):
    """A held lease on an output folder; ``release`` gives it back (idempotent)."""

    def release(self) -> None: ...


def take(lock_dir: Path | str, fp: dict, folder: Path | str | None = None) -> Lease:
    """Take the lease of ``folder`` (default: ``lock_dir``'s parent) with fingerprint ``fp``; lock files in
    ``lock_dir``. Raises ``FingerprintMismatch`` while a writer with another fingerprint holds it."""
    if "://" in str(lock_dir):
        raise InputError(f"{lock_dir}: output folders on object storage have no lease yet (docs/reliability.md); "
                         "write to a local or shared filesystem")
    lease = LocalLease(Path(lock_dir), fp, Path(folder) if folder is not None else Path(lock_dir).parent)
    try:
        lease.acquire()
    except OSError as exc:  # read-only filesystem, permissions, full disk: name the folder, no traceback
        raise (named_os_error(exc, lease.folder) or InputError(
            f"{lease.folder}: cannot write its lease ({lease.path.name}: {exc.strerror or exc}); the output folder "
            "must be on a writable filesystem with free space")) from None
    return lease


def fingerprint_diff(theirs: dict, ours: dict) -> str:
    """Name the fingerprint fields that differ (``k: theirs vs ours``)."""
    keys = []
    for name in ("stage", "code_version"):
        if theirs.get(name) != ours.get(name):
            keys.append(f"{name} {theirs.get(name)!r} vs {ours.get(name)!r}")
    a, b = theirs.get("params", {}) or {}, ours.get("params", {}) or {}
    keys += [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(keys) or "fingerprint hash differs"


class LocalLease:
    """The lease of a local folder (see the module docstring)."""

    def __init__(self, lock_dir: Path, fp: dict, folder: Path):
        self.lock_dir, self.fp, self.folder = lock_dir, fp, folder
        self.path = lock_dir / f"{PREFIX}{fp['hash'][:12]}.lock"
        self.handle: int | None = None

    def acquire(self) -> None:
        """Take the lease (shared with writers of the same fingerprint) or raise ``FingerprintMismatch``."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with _Mutex(self.lock_dir / MUTEX):
            for other in sorted(self.lock_dir.glob(f"{PREFIX}*.lock")):
                holder = None if other == self.path else _live_holder(other)
                if holder is not None:
                    raise FingerprintMismatch(self._refusal(holder))
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self.handle = fd
            if os.fstat(fd).st_size == 0:
                self._write_record()

    def _write_record(self) -> None:
        """Who holds the lease, for the refusal message; informational, so a full disk does not stop the writer
        (whose parts then fail by name) and only leaves the record empty."""
        try:
            os.write(self.handle, json.dumps(self._record(), sort_keys=True).encode())
        except OSError as exc:
            log.warning("%s: could not record the lease holder (%s)", self.path, exc)
            os.ftruncate(self.handle, 0)

    def release(self) -> None:
        """Give the lease back; the last writer of its fingerprint removes its lock file."""
        if self.handle is None:
            return
        with _Mutex(self.lock_dir / MUTEX):
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            os.close(self.handle)
            self.handle = None

    def __del__(self):  # a writer that never gave the lease back: the lock dies with the file descriptor
        if self.handle is not None:
            os.close(self.handle)

    def _record(self) -> dict:
        return {"fingerprint": self.fp, "host": socket.gethostname(), "pid": os.getpid(),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def _refusal(self, holder: dict) -> str:
        theirs = holder.get("fingerprint")
        who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}; "
               f"{fingerprint_diff(theirs, self.fp)}") if theirs else "its record could not be written"
        return (f"{self.folder}: another writer holds this output folder with other parameters ({who}); one writer "
                "per output: wait for it to finish, or write to a new --out folder")


def _live_holder(path: Path) -> dict | None:
    """The record of ``path`` when a live writer holds it; None (and the stale file removed) otherwise."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        try:
            record = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except ValueError:
            record = {}
        return record if isinstance(record, dict) else {}
    else:
        path.unlink(missing_ok=True)  # nobody holds it: its writers are gone
        return None
    finally:
        os.close(fd)


class _Mutex:
    """An exclusive ``flock`` on ``path`` for the duration of a ``with`` block (taking or giving back a lease)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

"""Parts and receipts: the unit of work, retry and completion of every stage.

``DIR/part-000123.<ext>`` is written to a temp name, fsynced, validated (readable, expected rows), renamed,
and the folder fsynced; then ``DIR/_parts/part-000123.json`` (the receipt) is written the same way. A part
without a valid receipt does not exist. Receipts carry the stage's fingerprint: a folder never mixes parts
made with different parameters. A writer holds the folder's lease (``pipeline.lease``) while it writes: one with
other parameters is refused before any work, and a receipt of another fingerprint is never overwritten.

A receipt names its fingerprint by hash, stage and code version only; the parameters themselves (class names,
per-class quotas: lists as long as the class count) are kept once per folder in ``_parts/_fingerprint-<hash>.json``
(and once in the manifest), so a receipt's size does not grow with the class count. Receipts also record the
part's samples, seconds, samples/s and finish time (``kdpipe status`` derives throughput and an ETA from them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from pipeline import __version__
from pipeline.atomic import publish, remove_stale_temps, staged, write_atomic
from pipeline.errors import STOP_TASK_ERRNOS, FingerprintMismatch, IntegrityError, PartFailed, named_os_error
from pipeline.hashing import sha256_file, sha256_json
from pipeline.lease import Lease, fingerprint_diff, take
from pipeline.signals import critical, fault_point

log = logging.getLogger(__name__)
RECEIPTS = "_parts"
PLAN_NAME = "_plan.json"
FINGERPRINT_PREFIX = "_fingerprint-"
RECEIPT_FINGERPRINT = ("hash", "stage", "code_version")  # what a receipt keeps of the fingerprint


def part_name(index: int) -> str:
    """``part-000123`` for part 123."""
    return f"part-{index:06d}"


def fingerprint(stage: str, params: dict, code_version: str) -> dict:
    """The parameters that change a stage's output, and their hash (named by every receipt, kept once per folder)."""
    body = {"stage": stage, "code_version": code_version, "params": params}
    return {"hash": sha256_json(body), **body}


@dataclass
class PartResult:
    """What a stage hands the store for one part, besides the file itself."""

    expected_rows: int | None = None
    failures: dict[str, list[str]] = field(default_factory=dict)
    input: dict | None = None
    extra: dict = field(default_factory=dict)
    samples: int | None = None  # input samples the part accounts for (default: its rows + failures)


class PartStore:
    """One stage's output folder: commit parts atomically, read receipts, refuse mixed fingerprints.

    Args:
        out_dir: the stage's output folder.
        suffix: the parts' file extension (``.parquet``, ``.tar``).
        fp: the stage's fingerprint (see ``fingerprint``).
        count_rows: returns a written file's rows/samples; it must raise on an unreadable file.
    """

    def __init__(self, out_dir: Path, suffix: str, fp: dict, count_rows: Callable[[Path], int]):
        self.out_dir = Path(out_dir)
        self.suffix = suffix
        self.fp = fp
        self.count_rows = count_rows
        self.receipts_dir = self.out_dir / RECEIPTS
        self._lease: Lease | None = None

    def part_path(self, index: int) -> Path:
        return self.out_dir / f"{part_name(index)}{self.suffix}"

    def receipt_path(self, index: int) -> Path:
        return self.receipts_dir / f"{part_name(index)}.json"

    def failure_path(self, index: int) -> Path:
        return self.receipts_dir / f"{part_name(index)}.failed.json"

    def prepare(self) -> None:
        """Create the folders, take the folder's lease, refuse a foreign fingerprint, remove temps of dead
        writers. The lease is held until ``release`` (``run_parts`` and ``finalize`` give it back)."""
        try:
            self.receipts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # read-only filesystem, no permission: named before any work (rc 2)
            raise (named_os_error(exc) or exc) from None
        self.acquire()
        try:
            self.check_fingerprint()
        except FingerprintMismatch:
            self.release()
            raise
        self._record_fingerprint()
        removed = remove_stale_temps(self.out_dir) + remove_stale_temps(self.receipts_dir)
        if removed:
            log.info("%s: removed %d stale temp file(s) of killed writers", self.out_dir, removed)

    def acquire(self) -> None:
        """Take the folder's lease with this store's fingerprint (no-op when held); see ``pipeline.lease``."""
        if self._lease is None:
            self.receipts_dir.mkdir(parents=True, exist_ok=True)
            self._lease = take(self.receipts_dir, self.fp, self.out_dir)

    def release(self) -> None:
        """Give the folder's lease back (no-op when not held)."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    @contextlib.contextmanager
    def leased(self) -> Iterator[None]:
        """Hold the lease for a ``with`` block (given back at its end only if taken here)."""
        held = self._lease is not None
        self.acquire()
        try:
            yield
        finally:
            if not held:
                self.release()

    def receipts(self) -> dict[int, dict]:
        """Every readable receipt in the folder, by part index (one scandir, one read each)."""
        return scan_folder(self.out_dir).receipts

    def fingerprint_path(self, fp_hash: str) -> Path:
        return self.receipts_dir / f"{FINGERPRINT_PREFIX}{fp_hash}.json"

    def _record_fingerprint(self) -> None:
        """Keep the full fingerprint once in the folder (content-addressed: every writer writes the same bytes)."""
        path = self.fingerprint_path(self.fp["hash"])
        if not path.exists():
            try:
                write_atomic(path, json.dumps(self.fp, indent=1, sort_keys=True).encode())
            except OSError as exc:  # informational only (it names the differing parameters of a refusal)
                log.warning("%s: could not record the fingerprint (%s)", path, exc)

    def check_fingerprint(self) -> None:
        """Raise ``FingerprintMismatch`` if any receipt was made with other parameters."""
        for index, receipt in sorted(self.receipts().items()):
            theirs = receipt.get("fingerprint", {})
            if theirs.get("hash") != self.fp["hash"]:
                raise FingerprintMismatch(
                    f"{self.out_dir}: {part_name(index)} was made with other parameters "
                    f"({fingerprint_diff(self.full(theirs), self.fp)}); parts are never mixed. "
                    "Write to a new --out folder, "
                    f"or delete {self.out_dir} to recompute.")

    def full(self, theirs: dict) -> dict:
        """A receipt's fingerprint with its params (from the folder's fingerprint file when the receipt has none)."""
        return full_fingerprint(self.out_dir, theirs) or theirs

    def committed(self, index: int, verify: bool = True) -> dict | None:
        """The part's receipt if it is committed (receipt valid, file size and sha256 match), else None."""
        return self.matching(index, _read_json(self.receipt_path(index)), verify)

    def matching(self, index: int, receipt: dict | None, verify: bool = True) -> dict | None:
        """``receipt`` (already read, e.g. from ``receipts()``) if it commits part ``index``, else None."""
        if receipt is None or receipt.get("fingerprint", {}).get("hash") != self.fp["hash"]:
            return None
        path = self.part_path(index)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size != receipt.get("bytes") or (verify and sha256_file(path) != receipt.get("sha256")):
            log.warning("%s: file differs from its receipt; it will be redone", path)
            return None
        return receipt

    def commit(self, index: int, write: Callable[[Path], PartResult], task: dict | None = None) -> dict:
        """Write part ``index`` with ``write(tmp_path)``, validate, publish, then write its receipt.

        If another writer committed the same part meanwhile, this one's file is discarded and the existing
        receipt returned: one commit wins, the part stays intact.
        """
        started = time.time()
        final = self.part_path(index)
        fault_point("part.begin")
        try:
            with staged(final) as tmp:
                result = write(tmp)
        except OSError as exc:  # ENOSPC, EIO...: name the part; the temp is already removed
            _stop_on_unwritable(exc, final)
            raise _os_failure(final, exc) from exc
        try:
            fault_point("part.written")
            rows = self._validate(index, tmp, result)
            receipt = self._receipt(index, tmp, rows, result, task, time.time() - started)
            fault_point("part.validated")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._publish(index, tmp, receipt)

    def _validate(self, index: int, tmp: Path, result: PartResult) -> int:
        rows = self.count_rows(tmp)
        if result.expected_rows is not None and rows != result.expected_rows:
            raise IntegrityError(f"{self.part_path(index)}: written part has {rows} rows, "
                                 f"expected {result.expected_rows}; nothing was published")
        return rows

    def _receipt(self, index: int, tmp: Path, rows: int, result: PartResult, task: dict | None,
                 seconds: float) -> dict:
        failure_count = sum(len(v) for v in result.failures.values())
        samples = rows + failure_count if result.samples is None else int(result.samples)
        return {
            "part": index, "file": self.part_path(index).name, "rows": rows,
            "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp), "input": result.input,
            "failures": {k: sorted(v) for k, v in sorted(result.failures.items()) if v},
            "failure_count": failure_count, "samples": samples,
            "fingerprint": {k: self.fp[k] for k in RECEIPT_FINGERPRINT}, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
            "finished_at": round(time.time(), 3), "host": socket.gethostname(),
            "task": task or {}, "kdpipe_version": __version__, "extra": result.extra,
        }

    def _publish(self, index: int, tmp: Path, receipt: dict) -> dict:
        lock_path = self.receipts_dir / f".lock-{part_name(index)}"
        with critical(), open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            existing = self.committed(index, verify=False)
            if existing is not None:
                tmp.unlink(missing_ok=True)
                log.info("%s was committed by another task meanwhile; discarded this copy", part_name(index))
                return existing
            self._refuse_foreign(index, tmp)
            publish(tmp, self.part_path(index))
            fault_point("part.published")
            body = json.dumps(receipt, indent=1, sort_keys=True).encode()
            try:
                write_atomic(self.receipt_path(index), body)
            except OSError as exc:  # no receipt, so the part must go too: a part without one does not exist
                self.part_path(index).unlink(missing_ok=True)
                raise _os_failure(self.part_path(index), exc) from exc
            fault_point("part.receipt")
            self.failure_path(index).unlink(missing_ok=True)
        return receipt

    def _refuse_foreign(self, index: int, tmp: Path) -> None:
        """Never overwrite a part committed with another fingerprint (a writer that got past the lease)."""
        theirs = (_read_json(self.receipt_path(index)) or {}).get("fingerprint", {})
        if theirs and theirs.get("hash") != self.fp["hash"]:
            tmp.unlink(missing_ok=True)
            raise FingerprintMismatch(
                f"{self.part_path(index)} was committed meanwhile by a writer with other parameters "
                f"({fingerprint_diff(theirs, self.fp)}); nothing was overwritten. One writer per output: "
                "write to a new --out folder")

    def record_failure(self, index: int, reason: str, message: str) -> dict:
        """Record a failed attempt of a part (attempts are counted across runs)."""
        previous = _read_json(self.failure_path(index)) or {}
        record = {"part": index, "reason": reason, "message": message,
                  "attempts": int(previous.get("attempts", 0)) + 1, "host": socket.gethostname(),
                  "time": time.time(), "fingerprint": self.fp["hash"]}
        try:
            write_atomic(self.failure_path(index), json.dumps(record, indent=1, sort_keys=True).encode())
        except OSError as exc:  # a full disk must not hide the part's own error; attempts are then not counted
            log.error("%s: could not record the failure of %s (%s)", self.out_dir, part_name(index), exc)
        return record

    def write_plan(self, num_parts: int) -> None:
        """Record the stage's part count in ``_parts/_plan.json`` (read by ``kdpipe status``); idempotent."""
        path = self.receipts_dir / PLAN_NAME
        plan = {"num_parts": int(num_parts), "fingerprint": self.fp["hash"]}
        if _read_json(path) != plan:
            try:
                write_atomic(path, json.dumps(plan, sort_keys=True).encode())
            except OSError as exc:  # informational only: a full disk must fail the parts, by name, not the task
                log.warning("%s: could not record the part count (%s); status shows no total until a rerun",
                            path, exc)

    def failures(self) -> dict[int, dict]:
        """Failure records of parts, by index (one scandir, reading only the failure records)."""
        out = {}
        if self.receipts_dir.is_dir():
            for entry in os.scandir(self.receipts_dir):
                if entry.name.endswith(".failed.json"):
                    rec = _read_json(Path(entry.path))
                    if rec is not None and isinstance(rec.get("part"), int):
                        out[rec["part"]] = rec
        return out


def _os_failure(final: Path, exc: OSError) -> PartFailed:
    """The named failure of a part whose file or receipt could not be written (ENOSPC, EIO...)."""
    return PartFailed(f"{final}: {exc}; nothing was published (free space or fix the disk, then rerun)",
                      "no_space" if exc.errno == errno.ENOSPC else "os_error")


def _stop_on_unwritable(exc: OSError, final: Path) -> None:
    """Raise a named ``OutputError`` (which stops the task) when the output folder itself cannot be written
    (read-only, no permission): every later part would fail the same way. Errors of inputs go on as a part's."""
    if exc.errno in STOP_TASK_ERRNOS and exc.filename and final.parent in (Path(exc.filename), Path(exc.filename).parent):
        raise named_os_error(exc, final) from None


@dataclass
class FolderScan:
    """What one scandir of a stage folder's ``_parts`` shows: receipts, failure records, the plan."""

    receipts: dict[int, dict] = field(default_factory=dict)
    failures: dict[int, dict] = field(default_factory=dict)
    plan: dict | None = None


def scan_folder(out_dir: Path) -> FolderScan:
    """Read every receipt, failure record and the plan of ``out_dir/_parts`` in one scandir (no fingerprint
    needed; for status tools). A part with both a receipt and a failure record counts as committed."""
    scan = FolderScan()
    folder = Path(out_dir) / RECEIPTS
    if not folder.is_dir():
        return scan
    for entry in os.scandir(folder):
        name = entry.name
        if name == PLAN_NAME:
            scan.plan = _read_json(Path(entry.path))
        elif name.startswith("part-") and name.endswith(".json"):
            record = _read_json(Path(entry.path))
            if record is not None and isinstance(record.get("part"), int):
                target = scan.failures if name.endswith(".failed.json") else scan.receipts
                target[record["part"]] = record
    for index in scan.receipts:
        scan.failures.pop(index, None)
    return scan


def full_fingerprint(out_dir: Path, receipt_fp: dict) -> dict | None:
    """The whole fingerprint (with ``params``) that a receipt of ``out_dir`` names; None if it is not kept."""
    if "params" in receipt_fp:  # receipts of older kdpipes carried it whole
        return receipt_fp
    if not isinstance(receipt_fp.get("hash"), str):
        return None
    return _read_json(Path(out_dir) / RECEIPTS / f"{FINGERPRINT_PREFIX}{receipt_fp['hash']}.json")


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, truncated or garbage."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

"""Stage outputs in object storage (``--out s3://bucket/prefix``, ``gs://...``): the commit protocol without rename.

``ObjectPartStore`` has ``PartStore``'s interface (``pipeline.tasks.run_parts`` drives it unchanged):

- a part is computed into a local temp file (``$TMPDIR/kdpipe-objstore/<prefix hash>/``, named like
  ``pipeline.atomic``'s temps so a rerun removes those of dead writers), validated, then uploaded as ONE object
  written whole (a single PUT below 5 GiB: the object appears complete or not at all);
- its receipt ``PREFIX/_parts/part-NNNNNN.json`` (``PartStore``'s fields; the fingerprint by hash, kept whole
  once in ``_parts/_fingerprint-<hash>.json``) is PUT after it: a part object without a receipt does not
  exist, and a rerun recomputes and overwrites it (there are no temp objects to clean in the bucket);
- a committed part is one whose receipt has the stage's fingerprint and whose object has the receipt's size
  (``verify``: and its sha256, streamed);
- ``finalize_remote`` creates ``PREFIX/manifest.json`` only if absent: a conditional create (``If-None-Match: *``)
  on S3 and stores that honour it; elsewhere (or where the store ignores it) a check-then-create, which two
  concurrent finalizers could race on (both write the same content when their parts agree).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from pipeline import __version__
from pipeline import manifest as mf
from pipeline.atomic import remove_stale_temps, staged
from pipeline.errors import FingerprintMismatch, IntegrityError, ManifestError, PartFailed, StorageError
from pipeline.hashing import sha256_file
from pipeline.parts import (
    FINGERPRINT_PREFIX,
    PLAN_NAME,
    RECEIPT_FINGERPRINT,
    RECEIPTS,
    FolderScan,
    PartResult,
    part_name,
)
from pipeline.signals import fault_point
from pipeline.storage import classify, filesystem, sha256_of

log = logging.getLogger(__name__)
WRITABLE = ("s3", "gs", "gcs")
_SINGLE_PUT = 3 << 30  # s3fs uses one PUT below 2x its chunk size (and S3 allows 5 GiB)


def is_remote_out(out) -> bool:
    """True for an object-storage ``--out`` (``s3://``, ``gs://``)."""
    return isinstance(out, str) and classify(out).scheme in WRITABLE


class _Object:
    """The few ``Path`` methods callers use on a receipt's location (``unlink``, ``name``, ``str``)."""

    def __init__(self, store: "ObjectPartStore", url: str):
        self.store, self.url, self.name = store, url, url.rsplit("/", 1)[-1]

    def unlink(self, missing_ok: bool = False) -> None:
        self.store.remove(self.url)

    def __str__(self) -> str:
        return self.url


class ObjectPartStore:
    """One stage's output prefix in object storage (see the module docstring)."""

    def __init__(self, url: str, suffix: str, fp: dict, count_rows: Callable[[Path], int]):
        url = classify(url).target  # s3:/b/x (a Path's rendering) -> s3://b/x
        self.out_dir = url.rstrip("/")
        self.suffix, self.fp, self.count_rows = suffix, fp, count_rows
        self.receipts_dir = f"{self.out_dir}/{RECEIPTS}"
        self.fs = filesystem(classify(url).scheme)
        self.scratch = Path(tempfile.gettempdir()) / "kdpipe-objstore" / hashlib.sha256(url.encode()).hexdigest()[:16]

    def part_path(self, index: int) -> str:
        return f"{self.out_dir}/{part_name(index)}{self.suffix}"

    def receipt_path(self, index: int) -> _Object:
        return _Object(self, f"{self.receipts_dir}/{part_name(index)}.json")

    def failure_path(self, index: int) -> str:
        return f"{self.receipts_dir}/{part_name(index)}.failed.json"

    def prepare(self) -> None:
        """Refuse a foreign fingerprint; remove local temps of dead writers."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.check_fingerprint()
        kept = f"{self.receipts_dir}/{FINGERPRINT_PREFIX}{self.fp['hash']}.json"  # the full parameters, once
        if self._read_json(kept) is None:
            self._put(kept, json.dumps(self.fp, indent=1, sort_keys=True).encode())
        removed = remove_stale_temps(self.scratch)
        if removed:
            log.info("%s: removed %d stale local temp file(s) of killed uploads", self.out_dir, removed)

    def full(self, theirs: dict) -> dict:
        """A receipt's fingerprint with its params (from the prefix's fingerprint object when it has none)."""
        if "params" in theirs or not isinstance(theirs.get("hash"), str):
            return theirs
        return self._read_json(f"{self.receipts_dir}/{FINGERPRINT_PREFIX}{theirs['hash']}.json") or theirs

    def acquire(self) -> None:
        """No lease object on object storage yet (its design is in ``pipeline.lease``): here the per-part check
        (a receipt of another fingerprint is never overwritten) and ``check_fingerprint`` keep writers apart."""

    def release(self) -> None:
        """Nothing to give back (see ``acquire``)."""

    @contextlib.contextmanager
    def leased(self) -> Iterator[None]:
        """The same ``with`` block as ``PartStore.leased``, with no lease (see ``acquire``)."""
        yield

    def _records(self, failed: bool) -> dict[int, dict]:
        """Receipts (or failure records) under ``_parts/`` by part: one listing, one GET per matching name."""
        try:
            names = self.fs.ls(self.receipts_dir, detail=False, refresh=True)
        except FileNotFoundError:
            return {}
        names = [n for n in names if n.rsplit("/", 1)[-1].startswith("part-") and n.endswith(".json")
                 and n.endswith(".failed.json") == failed]
        records = (self._read_json(n) for n in names)
        return {r["part"]: r for r in records if r is not None and isinstance(r.get("part"), int)}

    def receipts(self) -> dict[int, dict]:
        return self._records(failed=False)

    def failures(self) -> dict[int, dict]:
        return self._records(failed=True)

    def check_fingerprint(self) -> None:
        for index, receipt in sorted(self.receipts().items()):
            if receipt.get("fingerprint", {}).get("hash") != self.fp["hash"]:
                raise FingerprintMismatch(f"{self.out_dir}: {part_name(index)} was made with other parameters; "
                                          "parts are never mixed. Write to a new --out prefix, or delete it")

    def committed(self, index: int, verify: bool = True) -> dict | None:
        return self.matching(index, self._read_json(self.receipt_path(index).url), verify)

    def matching(self, index: int, receipt: dict | None, verify: bool = True) -> dict | None:
        if receipt is None or receipt.get("fingerprint", {}).get("hash") != self.fp["hash"]:
            return None
        try:
            size = int(self.fs.info(self.part_path(index), refresh=True)["size"])
        except FileNotFoundError:
            return None
        if size != receipt.get("bytes") or (verify and sha256_of(self.part_path(index))[0] != receipt.get("sha256")):
            log.warning("%s: object differs from its receipt; it will be redone", self.part_path(index))
            return None
        return receipt

    def commit(self, index: int, write: Callable[[Path], PartResult], task: dict | None = None) -> dict:
        """Compute the part locally, validate it, PUT it whole, then PUT its receipt."""
        started = time.time()
        self.scratch.mkdir(parents=True, exist_ok=True)
        with staged(self.scratch / f"{part_name(index)}{self.suffix}") as tmp:
            result = write(tmp)
            rows = self.count_rows(tmp)
            if result.expected_rows is not None and rows != result.expected_rows:
                raise IntegrityError(f"{self.part_path(index)}: written part has {rows} rows, expected "
                                     f"{result.expected_rows}; nothing was uploaded")
            receipt = self._receipt(index, tmp, rows, result, task, time.time() - started)
            fault_point("part.validated")
            body = tmp.read_bytes()
        tmp.unlink()
        self._put(self.part_path(index), body)  # one object written whole
        fault_point("part.published")
        self._put(self.receipt_path(index).url, json.dumps(receipt, indent=1, sort_keys=True).encode())
        fault_point("part.receipt")
        self.remove(self.failure_path(index))
        return receipt

    def _receipt(self, index: int, tmp: Path, rows: int, result: PartResult, task: dict | None,
                 seconds: float) -> dict:
        """``PartStore``'s receipt fields (the fingerprint by hash only: its size does not grow with the classes)."""
        failure_count = sum(len(v) for v in result.failures.values())
        samples = rows + failure_count if result.samples is None else int(result.samples)
        return {"part": index, "file": self.part_path(index).rsplit("/", 1)[-1], "rows": rows,
                "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp), "input": result.input,
                "failures": {k: sorted(v) for k, v in sorted(result.failures.items()) if v},
                "failure_count": failure_count, "samples": samples,
                "fingerprint": {k: self.fp[k] for k in RECEIPT_FINGERPRINT}, "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None,
                "finished_at": round(time.time(), 3), "host": socket.gethostname(), "task": task or {},
                "kdpipe_version": __version__, "extra": result.extra}

    def record_failure(self, index: int, reason: str, message: str) -> dict:
        previous = self._read_json(self.failure_path(index)) or {}
        record = {"part": index, "reason": reason, "message": message,
                  "attempts": int(previous.get("attempts", 0)) + 1, "host": socket.gethostname(),
                  "time": time.time(), "fingerprint": self.fp["hash"]}
        try:
            self._put(self.failure_path(index), json.dumps(record, indent=1, sort_keys=True).encode())
        except PartFailed as exc:
            log.error("%s: could not record the failure of %s (%s)", self.out_dir, part_name(index), exc)
        return record

    def write_plan(self, num_parts: int) -> None:
        plan = {"num_parts": int(num_parts), "fingerprint": self.fp["hash"]}
        url = f"{self.receipts_dir}/{PLAN_NAME}"
        if self._read_json(url) != plan:
            self._put(url, json.dumps(plan, sort_keys=True).encode())

    def remove(self, url: str) -> None:
        try:
            self.fs.rm_file(url)
        except FileNotFoundError:
            pass

    def _put(self, url: str, body: bytes) -> None:
        try:
            self.fs.pipe_file(url, body, chunksize=_SINGLE_PUT)
        except OSError as exc:
            raise PartFailed(f"{url}: upload failed ({exc}); nothing was committed, rerun the task",
                             "upload_failed") from exc

    def _read_json(self, url: str) -> dict | None:
        try:
            data = json.loads(self.fs.cat_file(url))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def scan_prefix(url: str) -> FolderScan:
    """``pipeline.parts.scan_folder`` of an object-storage prefix (``kdpipe status``): one listing of
    ``_parts/``, one GET per receipt, failure record and the plan."""
    fs, scan = filesystem(classify(url).scheme), FolderScan()
    try:
        names = fs.ls(f"{url.rstrip('/')}/{RECEIPTS}", detail=False, refresh=True)
    except FileNotFoundError:
        return scan
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base != PLAN_NAME and not (base.startswith("part-") and base.endswith(".json")):
            continue
        try:
            record = json.loads(fs.cat_file(name))
        except (OSError, ValueError):
            continue
        if base == PLAN_NAME:
            scan.plan = record if isinstance(record, dict) else None
        elif isinstance(record, dict) and isinstance(record.get("part"), int):
            (scan.failures if base.endswith(".failed.json") else scan.receipts)[record["part"]] = record
    for index in scan.receipts:
        scan.failures.pop(index, None)
    return scan


def finalize_remote(store: ObjectPartStore, num_parts: int, build: Callable[[list[dict]], dict],
                    sidecars: Callable[[dict], dict[str, bytes]] | None = None) -> str:
    """``pipeline.tasks.finalize`` for an object-storage prefix: the manifest is created only if absent."""
    receipts = store.receipts()
    missing = [i for i in range(num_parts) if store.matching(i, receipts.get(i), verify=False) is None]
    if missing:
        raise ManifestError(f"{store.out_dir}: cannot finalize, {len(missing)} of {num_parts} parts are not "
                            f"committed ({', '.join(part_name(i) for i in missing[:10])}); rerun their tasks")
    data = build([receipts[i] for i in range(num_parts)])
    target = f"{store.out_dir}/{mf.MANIFEST_NAME}"
    existing = store._read_json(target)
    if existing is None:
        for name, body in (sidecars(data) if sidecars else {}).items():
            store._put(f"{store.out_dir}/{name}", body)
        _create(store, target, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        existing = store._read_json(target)
    if existing is None or existing.get("id") != data["id"]:
        raise ManifestError(f"{target} exists with another id; write to a new --out prefix")
    return target


def _create(store: ObjectPartStore, url: str, body: bytes) -> None:
    """Create ``url`` only if absent: a conditional PUT where the store supports it, else check-then-PUT."""
    try:
        store.fs.pipe_file(url, body, mode="create")
    except FileExistsError:
        return  # another finalizer won; the caller compares ids
    except (TypeError, NotImplementedError, ValueError):
        if not store.fs.exists(url):
            store._put(url, body)
    except OSError as exc:
        raise StorageError(f"{url}: could not create the manifest ({exc})") from exc

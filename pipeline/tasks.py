"""Running one array task of a map stage, and finalizing the stage into its manifest.

A stage supplies ``produce(index)`` that commits one part through its ``PartStore``; this module skips
committed parts, contains per-part failures (the other parts go on), bounds attempts of a poisoned part,
and writes the manifest only when every part is committed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pipeline import manifest as mf
from pipeline.errors import FingerprintMismatch, KdpipeError, ManifestError, OutputError, PartFailed
from pipeline.lease import fingerprint_diff
from pipeline.parts import PartStore, part_name
from pipeline.progress import Progress, receipt_samples
from pipeline.signals import check_stop, install_stop_handler, stop_requested

log = logging.getLogger(__name__)


@dataclass
class TaskReport:
    """What one task did: parts committed now, skipped (already done), failed, given up."""

    committed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    given_up: list[int] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every part of the task is committed, 1 otherwise."""
        return 1 if (self.failed or self.given_up) else 0


def task_info(task_index: int, num_tasks: int) -> dict:
    """Who made a part: task ids and the SLURM job when there is one (stored in receipts)."""
    info = {"index": task_index, "count": num_tasks}
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        if var in os.environ:
            info[var.lower()] = os.environ[var]
    return info


def run_parts(store: PartStore, indices: Iterable[int], produce: Callable[[int], dict], *,
              max_attempts: int = 3, retry_failed: bool = False, desc: str = "parts",
              num_parts: int | None = None, part_samples: Callable[[int], int] | None = None,
              done_before: int = 0) -> TaskReport:
    """Commit every part in ``indices`` that is not committed yet.

    A pre-timeout signal (``SIGUSR1``, see ``pipeline.signals``) stops the task between parts (or abandons the
    part in flight) by raising ``StopForRequeue`` (exit code 75); a rerun resumes with the next part.

    Args:
        store: the stage's part store (``prepare`` is called here).
        indices: this task's block of parts.
        produce: commits part ``index`` (through ``store.commit``) and returns its receipt.
        max_attempts: a part that failed this many times is skipped until ``retry_failed``.
        retry_failed: try parts again that reached ``max_attempts``.
        desc: what the progress bar / progress lines call the task (``pipeline.progress``).
        num_parts: the stage's total part count, recorded for ``kdpipe status`` (optional).
        part_samples: the samples of part ``index``, when known before it runs (a better ETA).
        done_before: parts of the task the caller already found done (not in ``indices``; shown as done).
    """
    if not stop_requested():
        install_stop_handler()
    store.prepare()
    try:
        return _run_parts(store, indices, produce, max_attempts, retry_failed, desc, num_parts, part_samples,
                          done_before)
    finally:
        store.release()


def _run_parts(store: PartStore, indices: Iterable[int], produce: Callable[[int], dict], max_attempts: int,
               retry_failed: bool, desc: str, num_parts: int | None, part_samples: Callable[[int], int] | None,
               done_before: int) -> TaskReport:
    if num_parts is not None:
        store.write_plan(num_parts)
    report = TaskReport()
    failures = store.failures()
    indices = list(indices)
    samples_of = part_samples or (lambda _index: 0)
    expected = None if part_samples is None else sum(map(part_samples, indices))
    with Progress(desc, len(indices) + done_before, expected, done=done_before) as shown:
        for index in indices:
            check_stop(f"{store.out_dir} before {part_name(index)}")
            if _done_or_given_up(store, index, failures.get(index, {}), max_attempts, retry_failed, report):
                shown.skip(samples_of(index))
            else:
                shown.part_done(_attempt(store, index, produce, report))
    log.info("%s: %d committed, %d already done, %d failed, %d given up", store.out_dir,
             len(report.committed), len(report.skipped), len(report.failed), len(report.given_up))
    return report


def _done_or_given_up(store: PartStore, index: int, failure: dict, max_attempts: int, retry_failed: bool,
                      report: TaskReport) -> bool:
    """True (and recorded in ``report``) for a part already committed, or given up after ``max_attempts``."""
    if store.committed(index) is not None:
        report.skipped.append(index)
        return True
    if not retry_failed and failure.get("attempts", 0) >= max_attempts:
        log.error("%s: gave up after %d failed attempts (%s); rerun with --retry-failed",
                  part_name(index), failure["attempts"], failure.get("message"))
        report.given_up.append(index)
        return True
    return False


def _attempt(store: PartStore, index: int, produce: Callable[[int], dict], report: TaskReport) -> int | None:
    """Produce one part; return its samples (from its receipt), or None when it failed."""
    try:
        receipt = produce(index)
        report.committed.append(index)
    except OutputError:  # the output folder cannot be written at all: stop the task, named (rc 2)
        raise
    except (PartFailed, KdpipeError, OSError) as exc:
        reason = getattr(exc, "reason", type(exc).__name__)
        store.record_failure(index, reason, str(exc))
        report.failed[index] = str(exc)
        log.error("%s failed (%s): %s", part_name(index), reason, exc)
        return None
    return receipt_samples(receipt) if isinstance(receipt, dict) else None


def finalize(store: PartStore, num_parts: int, build: Callable[[list[dict]], dict]) -> Path:
    """Write the stage manifest once all ``num_parts`` parts are committed; idempotent.

    Args:
        store: the stage's part store.
        num_parts: how many parts the stage has.
        build: turns the receipts (in part order) into a manifest dict (``pipeline.manifest.build``).

    Returns:
        The manifest's path. A manifest already there with the same id is kept unchanged.

    Every receipt must carry the store's fingerprint (the one the manifest's params make), and the folder's lease
    is held meanwhile: a writer with other parameters cannot start while the manifest is being made.
    """
    with store.leased():
        return _finalize(store, num_parts, build)


def _finalize(store: PartStore, num_parts: int, build: Callable[[list[dict]], dict]) -> Path:
    receipts = store.receipts()
    foreign = {i: r for i, r in sorted(receipts.items()) if r.get("fingerprint", {}).get("hash") != store.fp["hash"]}
    if foreign:
        index, receipt = next(iter(foreign.items()))
        raise FingerprintMismatch(
            f"{store.out_dir}: cannot finalize, {len(foreign)} receipt(s) carry another fingerprint than this "
            f"manifest's ({part_name(index)}: "
            f"{fingerprint_diff(store.full(receipt.get('fingerprint', {})), store.fp)}); a "
            "manifest never lists parts of other parameters: write to a new --out folder")
    missing = [i for i in range(num_parts) if store.matching(i, receipts.get(i), verify=False) is None]
    if missing:
        shown = ", ".join(part_name(i) for i in missing[:10])
        raise ManifestError(f"{store.out_dir}: cannot finalize, {len(missing)} of {num_parts} parts are not "
                            f"committed ({shown}{', ...' if len(missing) > 10 else ''}); rerun their tasks")
    data = build([receipts[i] for i in range(num_parts)])
    target = store.out_dir / mf.MANIFEST_NAME
    if target.exists():
        existing = mf.load(target)
        if existing.id == data["id"]:
            return target
        raise ManifestError(f"{target} exists with another id ({existing.id[:12]} vs {data['id'][:12]}); "
                            "write to a new --out folder")
    try:
        return mf.write(data, store.out_dir)
    except ManifestError:
        if target.exists() and mf.load(target).id == data["id"]:  # a concurrent finalize wrote the same content
            return target
        raise


def file_entries(receipts: list[dict], count_key: str = "rows") -> list[dict]:
    """Manifest ``files`` entries from receipts (relative names, bytes, sha256, rows or samples)."""
    return [{"path": r["file"], "bytes": r["bytes"], "sha256": r["sha256"], count_key: r["rows"]}
            for r in receipts]


def failure_totals(receipts: list[dict]) -> dict[str, int]:
    """Failures by reason, summed over receipts."""
    totals: dict[str, int] = {}
    for receipt in receipts:
        for reason, keys in receipt.get("failures", {}).items():
            totals[reason] = totals.get(reason, 0) + len(keys)
    return dict(sorted(totals.items()))

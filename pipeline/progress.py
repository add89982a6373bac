"""Live progress of a long task, and throughput figures from receipts.

``Progress`` follows one task: parts done / total, samples, samples/s and an ETA. On a terminal (stderr is a
tty) it draws a tqdm bar; elsewhere (a SLURM log, a pipe) it logs one line every ``KDPIPE_PROGRESS_INTERVAL``
seconds (default 30; ``kdpipe --progress-interval S`` sets it) and one at the end. ``KDPIPE_PROGRESS`` forces a
mode: ``bar``, ``log`` or ``off`` (default ``auto``). Lines are written when figures change (a part ends, or a
stage reports samples of the part in flight with ``advance``), never from a thread: no timer outlives a task,
and a forked data loader inherits nothing running.

``run_parts`` (``pipeline.tasks``) opens one per task, so every map stage has it; code deep inside a part
(a compute batch) reports samples with the module-level ``advance(n)``, a no-op when no task is tracked.

``throughput(receipts, total)`` turns a folder's receipts into the same figures for ``kdpipe status``: samples,
per-part rate, busy wall time (the union of the parts' [start, end] spans, so parallel tasks count once and pauses
not at all), samples/s over it and the ETA of the parts still missing.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("kdpipe.progress")
INTERVAL_ENV = "KDPIPE_PROGRESS_INTERVAL"
MODE_ENV = "KDPIPE_PROGRESS"
MODES = ("auto", "bar", "log", "off")
DEFAULT_INTERVAL = 30.0
BAR_REFRESH = 0.2  # seconds between two redraws of a bar
_current: list["Progress"] = []


def interval() -> float:
    """Seconds between two progress log lines (``KDPIPE_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def mode() -> str:
    """``bar`` on a terminal, ``log`` elsewhere, unless ``KDPIPE_PROGRESS`` says ``bar``, ``log`` or ``off``."""
    wanted = os.environ.get(MODE_ENV, "auto").strip().lower()
    if wanted in ("bar", "log", "off"):
        return wanted
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "log"


def format_eta(seconds: float | None) -> str:
    """``1:02:03`` (or ``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Figures:
    """What a progress line shows."""

    done: int
    total: int
    samples: int
    rate: float | None
    eta: float | None

    def rates(self) -> str:
        rate = "?" if self.rate is None else f"{self.rate:.1f}"
        return f"{self.samples} samples, {rate} samples/s, ETA {format_eta(self.eta)}"

    def line(self, unit: str = "parts") -> str:
        return f"{self.done}/{self.total} {unit}, {self.rates()}"


class Progress:
    """Progress of one task over ``total`` parts.

    Args:
        desc: what runs (the stage), first on every line.
        total: parts of this task.
        expected_samples: samples of all ``total`` parts when known (the ETA is then samples left / rate; else
            parts left x seconds per part).
        unit: what a part is called on the line (``steps`` for training).
        done: parts already done before this task started (a resumed epoch).
        show: False for a silent tracker (e.g. on the non-main ranks of a DDP job).
    """

    def __init__(self, desc: str, total: int, expected_samples: int | None = None, unit: str = "parts",
                 done: int = 0, show: bool = True):
        self.desc, self.total, self.unit = desc, int(total), unit
        self.expected = expected_samples
        self.computed = self.samples = self.in_flight = self.skipped_samples = 0
        self.done = int(done)
        self.started = self._last = time.monotonic()
        self.mode = mode() if total and show else "off"
        self.interval = interval()
        self.bar = None
        if self.mode == "bar":
            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, file=sys.stderr, leave=True,
                            postfix=self.figures().rates(),  # tqdm puts ", " before the postfix
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + unit + "{postfix}")
            self._redirect = logging_redirect_tqdm()  # log lines go above the bar instead of through it
            self._redirect.__enter__()

    def __enter__(self) -> "Progress":
        _current.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _current.remove(self)
        self.close()

    def figures(self) -> Figures:
        """Figures now: parts done, samples computed in this task, samples/s, ETA."""
        elapsed = time.monotonic() - self.started
        samples = self.samples + self.in_flight
        rate = samples / elapsed if samples and elapsed > 0 else None
        eta = None
        if self.done >= self.total:
            eta = 0.0
        elif self.expected is not None and rate:
            eta = max(0.0, self.expected - self.skipped_samples - samples) / rate
        elif self.computed:
            eta = elapsed / self.computed * (self.total - self.done)
        return Figures(self.done, self.total, samples, rate, eta)

    def skip(self, expected: int = 0) -> None:
        """A part that was already done (it counts as done, not in the rate); ``expected``: its samples."""
        self.done += 1
        self.skipped_samples += expected
        self._show()

    def advance(self, samples: int) -> None:
        """``samples`` more of the part in flight are done."""
        self.in_flight += int(samples)
        self._show()

    def part_done(self, samples: int | None) -> None:
        """The part in flight ended with ``samples`` samples (None: what ``advance`` counted); failed parts too."""
        self.samples += self.in_flight if samples is None else int(samples)
        self.in_flight = 0
        self.done += 1
        self.computed += 1
        self._show()

    def _show(self) -> None:
        now = time.monotonic()
        if self.mode != "off" and now - self._last >= (BAR_REFRESH if self.bar is not None else self.interval):
            self._last = now
            self._emit()

    def _emit(self) -> None:
        figures = self.figures()
        if self.bar is not None:
            self.bar.n = figures.done
            self.bar.set_postfix_str(figures.rates(), refresh=False)
            self.bar.refresh()
        else:
            log.info("%s: %s", self.desc, figures.line(self.unit))

    def close(self) -> None:
        """The final figures (a log line, or the bar left on screen)."""
        if self.mode == "off":
            return
        self._emit()
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
        self.mode = "off"


def advance(samples: int) -> None:
    """Report ``samples`` more done in the part in flight of the innermost tracked task (no-op if none)."""
    if _current:
        _current[-1].advance(samples)


def receipt_samples(receipt: dict) -> int:
    """Samples a receipt accounts for: its ``samples``, else rows + failures (receipts of older kdpipes)."""
    if isinstance(receipt.get("samples"), int):
        return receipt["samples"]
    return int(receipt.get("rows", 0)) + int(receipt.get("failure_count", 0))


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end]`` spans."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def throughput(receipts: list[tuple[dict, float | None]], total: int | None) -> dict:
    """Figures of a stage folder from its receipts, each with its finish time (None: unknown).

    Returns ``samples``, ``seconds`` (summed over parts), ``busy_seconds`` (wall time some part was running),
    ``samples_per_s`` (samples / busy seconds), ``part_samples_per_s`` (samples / summed seconds: one task's
    rate) and ``eta_s`` (parts missing x busy seconds per part; None when complete or unknown).
    """
    samples = sum(receipt_samples(r) for r, _ in receipts)
    seconds = sum(float(r.get("seconds") or 0.0) for r, _ in receipts)
    spans = [(end - float(r.get("seconds") or 0.0), end) for r, end in receipts if end is not None]
    busy = busy_seconds(spans) if len(spans) == len(receipts) else seconds
    rate = samples / busy if busy > 0 and samples else None
    missing = None if total is None else max(0, total - len(receipts))
    eta = missing * busy / len(receipts) if missing and receipts and busy > 0 else None
    return {"parts": len(receipts), "samples": samples, "seconds": round(seconds, 3),
            "busy_seconds": round(busy, 3), "samples_per_s": None if rate is None else round(rate, 1),
            "part_samples_per_s": round(samples / seconds, 1) if seconds > 0 and samples else None,
            "eta_s": None if eta is None else round(eta, 1)}

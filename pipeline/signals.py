"""Process signals: the pre-timeout stop request (USR1 -> requeue) and test-only kill points.

A cluster job gets ``SIGUSR1`` some seconds before its time limit (``sbatch --signal=B:USR1@S``; the batch
script forwards it to the kdpipe process). ``install_stop_handler`` turns it into a stop request:

- mode ``finish`` (default): the part in flight is finished and committed, then the task stops;
- mode ``abandon``: the part in flight is abandoned at once (its temp file removed, nothing published);
- a second signal while finishing abandons.

Stopping raises ``StopForRequeue``, a ``SystemExit`` with code ``EXIT_REQUEUE`` (75): the process exits with
that code and the batch script requeues the task (``scontrol requeue``); the requeued task skips the parts
already committed. ``run_parts`` calls ``check_stop`` between parts; ``critical()`` defers an abandon while a
part and its receipt are being published.

Kill points: ``KDPIPE_FAULT=point:count`` makes the process SIGKILL itself the ``count``-th time it reaches the
named ``fault_point`` (a test device; it costs one dict look-up when the variable is unset).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request before the time limit; requeue the task
STOP_MODE_ENV = "KDPIPE_STOP_MODE"
FAULT_ENV = "KDPIPE_FAULT"
STOP_MODES = ("finish", "abandon")


class StopForRequeue(SystemExit):
    """Raised to stop a task on a stop request; exits the process with ``EXIT_REQUEUE``."""

    def __init__(self, message: str = "stopped on request (pre-timeout signal); requeue this task"):
        super().__init__(EXIT_REQUEUE)
        self.message = message


class _State:
    requested = False
    mode = "finish"
    installed = False
    critical_depth = 0
    deferred = False
    fault_hits: dict[str, int] = {}


def stop_mode() -> str:
    """The stop mode from ``KDPIPE_STOP_MODE`` (``finish`` when unset or unknown)."""
    mode = os.environ.get(STOP_MODE_ENV, "finish")
    return mode if mode in STOP_MODES else "finish"


def install_stop_handler(mode: str | None = None, signum: int = signal.SIGUSR1) -> bool:
    """Install the stop handler for ``signum`` (main thread only); return whether it is installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _State.mode = mode or stop_mode()
    signal.signal(signum, _on_signal)
    _State.installed = True
    return True


def _on_signal(signum: int, _frame) -> None:
    first = not _State.requested
    _State.requested = True
    log.warning("signal %d: stop requested (%s the part in flight, then exit %d for requeue)", signum,
                "finishing" if (first and _State.mode == "finish") else "abandoning", EXIT_REQUEUE)
    if _State.mode == "abandon" or not first:
        if _State.critical_depth:
            _State.deferred = True
        else:
            raise StopForRequeue("stopped on request; the part in flight was abandoned")


def stop_requested() -> bool:
    """True once a stop signal has arrived."""
    return _State.requested


def check_stop(where: str = "") -> None:
    """Raise ``StopForRequeue`` if a stop was requested (called between parts)."""
    if _State.requested:
        log.warning("stopping %s on request; exit %d so that the task is requeued", where, EXIT_REQUEUE)
        raise StopForRequeue()


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Defer an abandoning stop until the block (publishing a part and its receipt) is done."""
    _State.critical_depth += 1
    try:
        yield
    finally:
        _State.critical_depth -= 1
        if not _State.critical_depth and _State.deferred:
            _State.deferred = False
            raise StopForRequeue("stopped on request right after publishing a part")


def fault_point(name: str) -> None:
    """SIGKILL this process at the ``count``-th arrival here when ``KDPIPE_FAULT=name:count`` (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if point != name:
        return
    _State.fault_hits[name] = _State.fault_hits.get(name, 0) + 1
    if _State.fault_hits[name] == int(count):
        log.warning("fault injection: SIGKILL at %s (hit %s)", name, count)
        os.kill(os.getpid(), signal.SIGKILL)

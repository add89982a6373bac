"""Handing freed memory back to the operating system between the phases of a long streaming job.

Arrow's default pool (mimalloc or jemalloc) and glibc's malloc both keep freed memory for reuse, and
neither reuses what the other keeps: a job whose phases allocate in turn through numpy and through Arrow
then holds the high-water mark of each phase at once. ``release_memory`` between phases returns it
(``MemoryPool.release_unused``, glibc's ``malloc_trim``; a no-op where there is no ``malloc_trim``).
On ``kdpipe select`` of 2M images, RSS after its first pass drops from 360 to 190 MiB, so the next phase
starts from there (the run's peak went from ~480 to ~450 MiB: the phases' own peaks remain).

``one_arena`` goes further for a job of such phases run on several threads (the entry layer's choice: it is
process-wide): glibc keeps one arena instead of one per thread, so that what a phase freed, whichever thread freed
it, is one trim away from the OS. With Arrow allocating through malloc as well (``ARROW_DEFAULT_MEMORY_POOL=system``,
which the ``kdpipe`` command sets before pyarrow loads), ``kdpipe select`` of 2M images peaks at ~400 instead of
~510 MiB.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import pyarrow as pa

M_ARENA_MAX = -8  # glibc's mallopt parameter: the most malloc arenas


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The running process's C library when it is glibc (``gnu_get_libc_version`` present), else None."""
    if sys.platform == "win32":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def one_arena() -> None:
    """One glibc malloc arena for every thread started after this call (a no-op elsewhere than glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` from the running process's symbols, or None (other C libraries, Windows)."""
    return None if sys.platform == "win32" else getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_memory() -> None:
    """Return the memory Arrow's pool and malloc hold free to the OS (cheap: a few ms)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

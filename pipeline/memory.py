"""Handing freed memory back to the operating system between the phases of a long streaming job.

Arrow's default pool (mimalloc or jemalloc) and glibc's malloc both keep freed memory for reuse, and
neither reuses what the other keeps: a job whose phases allocate in turn through numpy and through Arrow
then holds the high-water mark of each phase at once. ``release_memory`` between phases returns it
(``MemoryPool.release_unused``, glibc's ``malloc_trim``; a no-op where there is no ``malloc_trim``).
Measured on ``kdpipe select`` of 2M images: peak RSS 500 -> ~330 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa


def _malloc_trim():
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Return the memory Arrow's pool and malloc hold free to the OS (cheap: a few ms)."""
    pa.default_memory_pool().release_unused()
    if _TRIM is not None:
        _TRIM(0)

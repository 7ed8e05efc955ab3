"""Giving the memory glibc malloc holds free back to the operating system.

Under load the service's threads (the request threadpool, the runtime's, the batcher's) each allocate from one of
glibc's malloc arenas (up to 8 per core). Memory a request frees stays in its arena for reuse, and with many
arenas and interleaved lifetimes much of it is never reused: RSS then creeps up while the bytes actually in use
stay flat (docs/reliability.md, "Soak"). malloc_trim(0) hands the free pages of every arena back (madvise),
without moving anything that is in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's malloc_trim, or None on a C library without it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return malloc's free pages to the OS; True when glibc released any. A no-op elsewhere."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False

"""Process-wide CPU settings that the `smalltalk` command applies once at start-up.

Tiny models allocate and free multi-megabyte activations for every op. glibc serves allocations over
128 kB (adaptive up to 32 MB) with fresh mmap'd pages and unmaps them on free, so each op pays page
faults on memory the kernel must zero: at d = 32-48 that was 15-25% of router-scoring wall time as
system time. Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse (the same
effect as preloading jemalloc/tcmalloc, without asking users to). The cost: peak RSS is not handed back
to the OS until exit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_applied = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Ask glibc malloc to reuse freed memory instead of unmapping it; True if applied (Linux/glibc)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _applied


def return_free_memory() -> None:
    """Hand the heap's free blocks back to the OS (glibc malloc_trim, every arena). A long pass calls it
    between chunks: kept-for-reuse memory then stays one chunk's worth instead of creeping up with
    fragmentation over thousands of chunks."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

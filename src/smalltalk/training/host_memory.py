"""Keep freed memory in a CPU process instead of handing it back to the kernel op after op.

PyTorch's CPU tensors come from malloc. glibc returns the top of its heap to the kernel once more than
its trim threshold is free, and serves large blocks with fresh mmaps, unmapped again on free; both
thresholds adapt to recent frees. Each fresh page then costs a page fault on first touch, on memory the
kernel must zero:
- a training step frees most of its activations at the end of the backward pass, so the next step asks
  for them again: ~20k faults a step on the cpu-expert-2m batch (benchmarks/speed/bench_vs_nanogpt.py),
  several percent of its time;
- tiny models (routers, d = 32-48) allocate and free multi-megabyte activations for every op: 15-25% of
  router-scoring wall time was system time.
Fixed thresholds make glibc keep that memory for reuse, as a caching allocator does on GPUs (and as
jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends preloading, do on their own). The
process's resident memory then stays at its peak; a long pass that wants it back between chunks calls
`return_free_memory`.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks under it come from the heap and stay there on free, past glibc's adaptive
#                             32 MB ceiling too (256 prefixes of 256 tokens: 268 MB of logits at a 1k vocabulary)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before any is returned


@functools.cache  # one answer per process; return_free_memory runs between every partition chunk
def _glibc() -> ctypes.CDLL | None:
    """glibc, where it is this process's malloc. A preloaded allocator (jemalloc, tcmalloc: LD_PRELOAD or
    /etc/ld.so.preload) keeps freed memory by itself and ignores glibc's thresholds."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return None
    return libc


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process; False where malloc is not glibc's.
    Idempotent. Batch passes call it (`train()`, partition, the eval stage); a server does not: its
    memory would stay at its peak for the life of the process."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))


def return_free_memory() -> None:
    """Hand the heap's free blocks back to the kernel (glibc's malloc_trim, every arena). A long pass calls
    it between chunks: kept-for-reuse memory then stays one chunk's worth instead of creeping up with
    fragmentation over thousands of chunks."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

"""Keep freed memory in a CPU training process instead of handing it back to the kernel every step.

PyTorch's CPU tensors come from malloc. glibc returns the top of its heap to the kernel once more than
its trim threshold is free, and serves large blocks with fresh mmaps; both thresholds adapt to recent
frees. A training step frees most of its activations at the end of the backward pass, so the next step
asks the kernel for them again and takes a page fault per 4 KB page on first touch: ~20k faults a step
on the cpu-expert-2m batch (benchmarks/bench_vs_nanogpt.py), several percent of its time. Fixed
thresholds make glibc keep that memory for the next step, as a caching allocator does on GPUs (and as
jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends preloading, do on their own). The
process's resident memory then stays at its peak, which a training step reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling: blocks above it are always mmapped (a chunk of logits stays under it)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before any is returned


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process; False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))

"""keep_freed_memory: a CPU step's activations come back without page faults, large blocks too.

The baseline is a step whose freed memory is handed back (return_free_memory, glibc's malloc_trim): its
next step faults every page in again. glibc's own default lies between the two and depends on the heap's
layout (what else the process allocated between the blocks), so it is printed, not asserted on.
"""

import os
import subprocess
import sys

import pytest

from smalltalk.training.host_memory import keep_freed_memory

STEP = """
import resource, sys, torch
from smalltalk.training.host_memory import keep_freed_memory, return_free_memory
mode, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode != "default":
    assert keep_freed_memory()
def step():  # a step's activations, all freed at its end
    activations = [torch.ones(size) for _ in range(count)]
    del activations
    if mode == "returned":
        return_free_memory()
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_third_step(mode: str, size: int, count: int) -> int:
    """Page faults of a fresh process's third step; glibc's tunables unset so no setting of the CI's leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", STEP, mode, str(size), str(count)], capture_output=True,
                          text=True, check=True, env=env)
    return int(done.stdout.strip())


@pytest.mark.skipif(not keep_freed_memory(), reason="malloc is not glibc's")
@pytest.mark.parametrize("size, count", [
    (2_000_000, 40),  # a training step's: forty 8 MB tensors
    (12_000_000, 10),  # 48 MB blocks, over glibc's adaptive mmap ceiling (a router batch's logits are larger)
])
def test_kept_memory_spares_the_next_steps_page_faults(size: int, count: int):
    pages = size * count * 4 // 4096
    returned, kept = _faults_of_third_step("returned", size, count), _faults_of_third_step("keep", size, count)
    print(f"faults of the third step: returned {returned}, glibc default "
          f"{_faults_of_third_step('default', size, count)}, kept {kept}; {pages} pages")
    assert returned > pages * 0.9  # handed back, every 4 KB page faulted in again: the counter sees it
    assert kept < pages / 5

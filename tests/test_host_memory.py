"""keep_freed_memory: a CPU step's activations come back without page faults, large blocks too."""

import platform
import subprocess
import sys

import pytest

STEP = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from smalltalk.host_memory import keep_freed_memory
    assert keep_freed_memory()
size, count = int(sys.argv[2]), int(sys.argv[3])
def step():  # a step's activations, all freed at its end
    activations = [torch.ones(size) for _ in range(count)]
    del activations
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_third_step(mode: str, size: int, count: int) -> int:
    done = subprocess.run([sys.executable, "-c", STEP, mode, str(size), str(count)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("size, count", [
    (2_000_000, 40),  # a training step's: forty 8 MB tensors
    (12_000_000, 10),  # 48 MB blocks, over glibc's adaptive mmap ceiling (a router batch's logits are larger)
])
def test_kept_memory_spares_the_next_steps_page_faults(size: int, count: int):
    default, kept = _faults_of_third_step("default", size, count), _faults_of_third_step("keep", size, count)
    assert default > size * count * 4 // 4096 * 0.9  # all of it handed back and faulted in again, 4 KB a fault
    assert kept < default / 5

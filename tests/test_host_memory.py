"""keep_freed_memory: a CPU training step's activations come back without page faults."""

import platform
import subprocess
import sys

import pytest

STEP = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from smalltalk.host_memory import keep_freed_memory
    assert keep_freed_memory()
def step():  # a training step's activations: forty 8 MB tensors, all freed at its end
    activations = [torch.ones(2_000_000) for _ in range(40)]
    del activations
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_third_step(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_memory_spares_the_next_steps_page_faults():
    default, kept = _faults_of_third_step("default"), _faults_of_third_step("keep")
    assert default > 40_000  # 320 MB handed back and faulted in again, 4 KB a fault
    assert kept < default / 10

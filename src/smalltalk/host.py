"""What this process may use of the machine.

Its cores are the ones it may run on (`taskset`, SLURM's CPU binding, a container's cpuset), capped by
OMP_NUM_THREADS, not the machine's count: jobs split them, and splitting cores the process does not have runs
more threads than cores. (Two processes of two threads each on 2 cores trained a 41k-parameter model at 14k
tokens/s each; one thread alone trains it at 80k.)"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (at least 1), capped by OMP_NUM_THREADS when it is set: a process
    given one thread (as torch reads it) hands no more to its jobs."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform (macOS): the machine's count
        cores = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(omp)) if omp.isdigit() and int(omp) > 0 else cores)


def threads_per_job(jobs: int) -> int:
    """Threads for each of `jobs` processes run at once on this process's cores (at least 1)."""
    return max(1, usable_cores() // max(1, jobs))


def die_with_parent() -> None:
    """In a child process (Popen's preexec_fn): be killed when the process that started it dies (Linux's
    PR_SET_PDEATHSIG), so a SIGKILLed stage leaves no job training on behind it; its rerun resumes the job
    from its checkpoints. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass

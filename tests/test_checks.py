"""benchmarks/checks/: the scripts a GPU session runs must find the repository wherever they are started from."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = "train,scoring,pipeline,parts,torchrun,serving,sft,forward,export"


def test_gpu_check_runs_from_the_repository_root_wherever_it_is_started(tmp_path):
    """It lives in benchmarks/checks/ and reads configs/, tests/ and .venv relative to the root: after the move
    from benchmarks/ it cd'ed to benchmarks/ and every section failed (ModuleNotFoundError) on the GPU machine."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "checks" / "gpu_check.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PY": sys.executable, "DEVICE": "cpu", "SKIP": SECTIONS})
    assert done.returncode == 0, done.stderr
    assert f"root {ROOT};" in done.stdout and "torch " in done.stdout
    assert all(f"{name}: skipped" in done.stdout for name in SECTIONS.split(","))

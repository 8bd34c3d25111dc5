"""`smalltalk data prepare` (data/prepare.py): in parts by input file, merged to the bytes of one process."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT, TINY_CONFIG, cli, make_documents, write_jsonl

VOLATILE = ("seconds", "mb_per_s", "tokenizer_dir", "data_config")


def test_parts_merge_to_the_bytes_of_one_process(prepared_run, tmp_path, capsys):
    docs = make_documents(150, seed=5)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for k in range(5):  # five files, each with its own mix of domains
        write_jsonl(inputs / f"part-{k}.jsonl", docs[k * 30:(k + 1) * 30])
    common = ["--config", TINY_CONFIG, "--run", prepared_run, "--input", inputs, "--set", "data.max_docs=null"]
    assert cli("data", "prepare", *common, "--out", tmp_path / "one") == 0
    for k in (2, 0, 1):  # any order
        assert cli("data", "prepare", *common, "--out", tmp_path / "three", "--part", f"{k}/3") == 0
    assert not (tmp_path / "three" / "manifest.json").exists()
    assert cli("data", "prepare", *common, "--out", tmp_path / "three", "--merge") == 0
    one, three = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "three"))
    assert {k: v for k, v in one.items() if k not in VOLATILE} == {k: v for k, v in three.items() if k not in VOLATILE}
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "three").iterdir()) and "train.bin" in names
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name
    assert not (tmp_path / "three.parts").exists()
    capsys.readouterr()
    assert cli("data", "prepare", *common[:-2], "--out", tmp_path / "capped", "--part", "0/2") == 2
    assert "max_docs" in capsys.readouterr().err


def test_launch_data_in_parts(prepared_run, tmp_path):
    """`launch --stage data` runs the parts as processes and merges; SLURM gets an array and a merge job."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(prepared_run / "tokenizer", run / "tokenizer")
    docs = write_jsonl(tmp_path / "docs.jsonl", make_documents(60, seed=2))
    args = [sys.executable, "-m", "smalltalk.cli", "launch", "--config", str(TINY_CONFIG), "--run", str(run),
            "--stage", "data", "--set", f"data.inputs=[{docs},{docs}]", "--set", "data.max_docs=null"]
    subprocess.run([*args, "--parallel", "2"], check=True, cwd=ROOT, timeout=300)
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["documents"] == 120 and manifest["splits"]["train"]["sequences"] > 0
    subprocess.run([*args, "--scheduler", "slurm", "--parallel", "4"], check=True, cwd=ROOT, timeout=300)
    array = (run / "jobs" / "data.sbatch").read_text()
    assert "#SBATCH --array=0-3" in array and "data prepare" in array and "--part ${SLURM_ARRAY_TASK_ID}/4" in array
    assert "--merge" in (run / "jobs" / "data-merge.sbatch").read_text()

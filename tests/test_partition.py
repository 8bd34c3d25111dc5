"""`smalltalk partition` (routing/partition.py): chunks in the data's seeded order, bounded memory, parts
that merge to the same bytes however they were run (one process, torchrun ranks, separate jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smalltalk.data.shards import SplitData

from .conftest import ROOT, TINY_CONFIG, cli, make_documents, partition_with, write_jsonl


def _shares(out: Path, manifest: dict) -> list[np.ndarray]:
    return [np.load(out / name) for name in manifest["files"]]


def test_partition_invariants_and_determinism(prepared_run, em_run, tmp_path):
    a = partition_with(prepared_run, em_run, tmp_path / "a")
    b = partition_with(prepared_run, em_run, tmp_path / "b")
    n = len(SplitData(prepared_run / "data", "train"))
    seen = np.zeros(n, dtype=np.int64)
    for share in _shares(tmp_path / "a", a):
        np.add.at(seen, share, 1)
    assert (seen == 1).all(), "every sequence exactly once"
    assert max(a["counts"]) - min(a["counts"]) <= 1 and a["sha256"] == b["sha256"]
    assert a["prefix"] == 16 and a["quality"]["nmi"] > 0.15 and a["chunks"] == 1
    assert not (tmp_path / "a.parts").exists(), "parts are dropped once merged"
    chunked = partition_with(prepared_run, em_run, tmp_path / "c", "--chunk-size", "50")
    assert chunked["chunk_size"] == 50 and chunked["chunks"] == -(-n // 50) and sum(chunked["counts"]) == n


def test_chunks_follow_the_seeded_order_not_the_file_order(prepared_run, em_run, tmp_path):
    """Files in domain order: a chunk smaller than a domain must still be a sample of every domain, so
    chunked partition specialises as well as partitioning everything at once."""
    docs = make_documents(240, seed=3)
    inputs = []
    for domain in sorted({d["domain"] for d in docs}):  # one file per domain: the sequences come in blocks
        inputs.append(write_jsonl(tmp_path / f"{domain}.jsonl", [d for d in docs if d["domain"] == domain]))
    data = tmp_path / "ordered-data"
    assert cli("data", "prepare", "--config", TINY_CONFIG, "--run", prepared_run, "--out", data, "--input",
               *inputs, "--set", "data.max_docs=null") == 0
    labels = SplitData(data, "train").seq_domains
    per_domain = np.bincount(labels).min()
    assert (np.diff(labels) != 0).sum() == 2, "the train split is in domain order"
    common = ["--config", TINY_CONFIG, "--run", prepared_run, "--routers", em_run, "--data", data]
    assert cli("partition", *common, "--out", tmp_path / "whole", "--chunk-size", "100000") == 0
    chunk = per_domain // 3
    assert cli("partition", *common, "--out", tmp_path / "chunked", "--chunk-size", chunk) == 0
    whole, chunked = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "chunked"))
    assert chunked["chunks"] > 3 and whole["quality"]["nmi"] > 0.15  # file-order chunks would give ~0
    assert abs(chunked["quality"]["nmi"] - whole["quality"]["nmi"]) <= 0.02


def test_separate_part_jobs_merge_to_the_same_bytes(prepared_run, em_run, tmp_path, capsys):
    one = partition_with(prepared_run, em_run, tmp_path / "one", "--chunk-size", "40")
    total = one["chunks"]
    cuts = [0, total // 3, 2 * total // 3, total]
    common = ["--config", TINY_CONFIG, "--run", prepared_run, "--routers", em_run, "--out", tmp_path / "parts",
              "--chunk-size", "40"]
    for start, stop in reversed(list(zip(cuts, cuts[1:], strict=False))):  # any order, any process
        assert cli("partition", *common, "--chunks", f"{start}:{stop}") == 0
    assert not (tmp_path / "parts" / "manifest.json").exists(), "a part job does not merge"
    assert cli("partition", *common, "--chunks", f"0:{cuts[1] + 1}") == 2  # overlaps a finished part
    assert "overlap" in capsys.readouterr().err
    assert cli("partition", *common, "--merge") == 0
    merged = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    for name in one["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()
    assert {k: v for k, v in merged.items() if k not in ("seconds", "routers", "data")} == \
        {k: v for k, v in one.items() if k not in ("seconds", "routers", "data")}


def test_merge_refuses_missing_chunks(prepared_run, em_run, tmp_path, capsys):
    common = ["--config", TINY_CONFIG, "--run", prepared_run, "--routers", em_run, "--out", tmp_path / "p",
              "--chunk-size", "40"]
    assert cli("partition", *common, "--part", "0/3") == 0
    assert cli("partition", *common, "--merge") == 2
    assert "do not cover" in capsys.readouterr().err and not (tmp_path / "p" / "manifest.json").exists()
    assert cli("partition", *common) == 0  # without a range: fills the gaps, then merges
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["kind"] == "partition"


@pytest.mark.slow
def test_partition_under_torchrun_is_byte_identical(prepared_run, em_run, tmp_path):
    single = partition_with(prepared_run, em_run, tmp_path / "one", "--set", "routing.score_batch_size=7",
                            "--chunk-size", "100")
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "smalltalk.cli", "partition",
                    "--config", str(TINY_CONFIG), "--run-dir", str(prepared_run), "--routers", str(em_run),
                    "--out", str(tmp_path / "two"), "--set", "routing.score_batch_size=7", "--chunk-size", "100"],
                   check=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    double = json.loads((tmp_path / "two" / "manifest.json").read_text())
    for name in single["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert single["sha256"] == double["sha256"] and single["quality"] == double["quality"]

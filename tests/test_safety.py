"""Nothing lost, nobody in: temps of live writers survive `status`, replaced artifacts never vanish, storage
errors are never swallowed, outputs never land in a run, and untrusted files give one clear error.

A test whose docstring says "Was:" failed on the code before issue #28's fixes, for the reason it gives
(checked by running this file against that commit)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smalltalk import fsutil
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_jsonl, remove_stale_temps, write_json, writer_tag
from smalltalk.layout import RunLayout
from smalltalk.run.launch import slurm_script

from .conftest import TINY_CONFIG, cli, write_jsonl

TRAIN = ["--config", str(TINY_CONFIG)]


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- temps and their writers -------------------------------------------------------------------------------

def test_status_never_touches_a_checkpoint_being_written(pipeline_run, live_process):
    """Was: `smalltalk status` (checkpoint_dirs) deleted every .step_*.tmp-* folder, a live writer's too."""
    checkpoints = pipeline_run[0] / "experts" / "00" / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    live = checkpoints / f".step_00000099.tmp-{writer_tag(live_process.pid)}"
    dead = checkpoints / f".step_00000098.tmp-{writer_tag(os.getpid()).split('@')[0]}@{_dead_pid()}@1"
    try:
        for temp in (live, dead):
            temp.mkdir()
            (temp / "model.safetensors").write_bytes(b"half")
        assert cli("status", pipeline_run[0]) == 0
        assert live.is_dir() and dead.is_dir(), "status is read-only"
    finally:
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)


def test_stale_temps_are_judged_by_host_pid_and_start_time(tmp_path, live_process):
    """Was: liveness by local pid only: a temp written on another node of a shared file system was deleted
    whenever its pid did not exist here, and a reused pid kept a dead writer's temp forever."""
    host = writer_tag().split("@")[0]
    live = tmp_path / f".a.tmp-{writer_tag(live_process.pid)}"
    other_node = tmp_path / f".b.tmp-some-other-node.cluster@{_dead_pid()}@5"
    reused_pid = tmp_path / f".c.tmp-{host}@{live_process.pid}@1"  # the pid lives, but started at another time
    dead = tmp_path / f".d.json.tmp-{host}@{_dead_pid()}@7.json"
    for path in (live, other_node, reused_pid):
        path.mkdir()
    dead.write_text("{")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([reused_pid, dead])
    assert live.is_dir() and other_node.is_dir()


def test_a_replaced_artifact_is_never_missing_and_old_copies_are_cleaned(tmp_path, monkeypatch):
    """Was: atomic_dir renamed the old folder aside and then the new one in (a window with no folder), and a
    writer killed between the two left `.NAME.old-PID` that nothing cleaned or restored."""
    final = tmp_path / "routers"
    for version in ("v1", "v2"):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text(version)
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routers"]
    # a writer of the two-rename fallback died between its renames: the old artifact goes back in place
    host = writer_tag().split("@")[0]
    os.replace(final, tmp_path / f".routers.old-{host}@{_dead_pid()}@3")
    assert remove_stale_temps(tmp_path) and (final / "weights").read_text() == "v2"
    # a leftover old copy beside a finished artifact is deleted, the artifact kept
    shutil.copytree(final, tmp_path / f".routers.old-{host}@{_dead_pid()}@3")
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routers"]
    # where the kernel cannot swap, the fallback still ends with the new artifact and nothing else
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v3")
    assert (final / "weights").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["routers"]


def test_fsync_errors_are_raised_and_leave_the_old_file(tmp_path, monkeypatch):
    """Was: _fsync swallowed every OSError, so a write the disk never took (EIO, ENOSPC) was published."""
    path = tmp_path / "state.json"
    write_json(path, {"v": 1})

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_torn_last_line_of_a_log_is_dropped_and_a_bad_middle_line_named(tmp_path):
    """The helper every reader of metrics.jsonl now uses (status, resume and report crashed on a torn line:
    the next test)."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(SmalltalkError, match="metrics.jsonl:2"):
        read_jsonl(log)


def test_status_resume_and_report_survive_a_torn_metrics_line(prepared_run, tmp_path, pipeline_run):
    """Was: `status`, `train --resume` and `report` raised JSONDecodeError on a torn last metrics line."""
    out = tmp_path / "lm"
    every = ["--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=4", *every) == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.')
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=6", *every,
               "--resume") == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    metrics = pipeline_run[0] / "experts" / "00" / "metrics.jsonl"
    before = metrics.read_bytes()
    try:
        metrics.write_bytes(before + b'{"step": 99, "lo')
        assert cli("status", pipeline_run[0]) == 0
        from smalltalk.evaluation.report import training_curves

        assert training_curves(RunLayout(pipeline_run[0]))["expert 00"][-1]["step"] != 99
    finally:
        metrics.write_bytes(before)


# ---- a full disk ---------------------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "simulated")


def test_a_checkpoint_save_that_hits_a_full_disk_keeps_the_previous_one(prepared_run, tmp_path, monkeypatch,
                                                                         capsys):
    """The second checkpoint's write fails with ENOSPC: one clear error (exit 2), no temp left, the first
    checkpoint intact, and a resume once there is room ends with the weights of an uninterrupted run.
    Was: a traceback."""
    from safetensors.torch import load_file

    import smalltalk.training.checkpoint as checkpoint

    every = ["--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3"]
    ref, out = tmp_path / "ref", tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", ref, "--set", "train.steps=6", *every) == 0
    real_save, calls = torch.save, []

    def save_then_fail(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            _enospc()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fail)
    capsys.readouterr()
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=6", *every) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "No space left" in err and "Traceback" not in err and "rerun" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=6", *every,
               "--resume") == 0
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


_KILLED_WHILE_PRUNING = """
import os, shutil, signal, sys
from pathlib import Path
from smalltalk.llama import ModelSpec, build_model
from smalltalk.training.checkpoint import save_checkpoint

out, model = sys.argv[1], build_model(ModelSpec(16, 1, 2, 32, vocab_size=64), max_positions=16, seed=0)
for step in (1, 2):
    save_checkpoint(out, step, model, {"step": step})

def deletes_one_file_then_dies(path, *args, **kwargs):  # SIGKILL in the middle of deleting a tree
    next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
    os.kill(os.getpid(), signal.SIGKILL)

shutil.rmtree = deletes_one_file_then_dies
save_checkpoint(out, 3, model, {"step": 3})  # keep=2: prunes step 1
"""


def test_a_trainer_killed_while_pruning_an_old_checkpoint_leaves_no_half_checkpoint(tmp_path):
    """SIGKILL while the oldest checkpoint is being deleted: what is left under a checkpoint's name is whole
    (the newer two), and the half-deleted one is a temp that the next cleanup removes. Was: the pruned
    directory kept its name with some files gone, listed as a checkpoint, and a rerun that found the
    training finished never removed it (the kill-anywhere test saw a stray dense/matched/step_* folder)."""
    from smalltalk.llama import ModelSpec, build_model
    from smalltalk.training.checkpoint import checkpoint_dirs, load_checkpoint

    out = tmp_path / "lm"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_PRUNING, str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert [d.name for d in checkpoint_dirs(out)] == ["step_00000002", "step_00000003"]
    model = build_model(ModelSpec(16, 1, 2, 32, vocab_size=64), max_positions=16, seed=1)
    assert all(load_checkpoint(d, model)["step"] == int(d.name[-1]) for d in checkpoint_dirs(out))
    assert len(remove_stale_temps(out)) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def test_a_partition_part_that_hits_a_full_disk_keeps_the_finished_parts(prepared_run, em_run, tmp_path,
                                                                         monkeypatch, capsys):
    """Part 2 of 3 fails with ENOSPC while writing: exit 2 with one clear error, part 1 intact, no temp left;
    the rerun fills the gap and merges to the bytes of a partition that never failed."""
    import smalltalk.routing.partition as partition

    common = ["partition", "--config", TINY_CONFIG, "--run", prepared_run, "--routers", em_run]
    assert cli(*common, "--out", tmp_path / "ref", "--chunk-size", "40") == 0
    parts = [*common, "--out", tmp_path / "p", "--chunk-size", "40"]
    assert cli(*parts, "--part", "0/3") == 0
    real = partition.write_json
    monkeypatch.setattr(partition, "write_json", lambda path, obj: _enospc() if "parts" in str(path) else
                        real(path, obj))
    capsys.readouterr()
    assert cli(*parts, "--part", "1/3") == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "Traceback" not in err
    left = sorted(p.name for p in (tmp_path / "p.parts").iterdir())
    assert len(left) == 1 and not any(fsutil.is_temp(p) for p in (tmp_path / "p.parts").rglob("*"))
    monkeypatch.setattr(partition, "write_json", real)
    assert cli(*parts) == 0
    for name in sorted(p.name for p in (tmp_path / "ref").glob("expert_*.npy")):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


# ---- outputs that would replace a run's artifacts ---------------------------------------------------------

def test_export_and_sft_never_write_into_a_run(pipeline_run, instructions, tmp_path, capsys):
    """Was: `export --out RUN/routers --force` replaced the run's routers (the run stopped loading) and
    `sft --out RUN` rewrote the pre-training run's tokenizer, mixture.json and dense baseline."""
    run = pipeline_run[0]
    snapshot = {p: p.read_bytes() for p in [run / "mixture.json", *(run / "routers").rglob("*")] if p.is_file()}
    assert cli("export", "--run", run, "--out", run / "routers", "--force") == 2
    assert cli("export", "--run", run, "--out", run / "exports" / "x") == 2
    assert "run directory" in capsys.readouterr().err
    for target in (run, run / "routers", run / "experts"):
        assert cli("sft", "--config", TINY_CONFIG, "--run", run, "--data", instructions, "--out", target) == 2
        assert "lies inside the run" in capsys.readouterr().err
    assert all(p.read_bytes() == data for p, data in snapshot.items())
    from smalltalk.mixture.model import SmallTalkMixture

    assert SmallTalkMixture.from_pretrained(run).num_experts == 3


# ---- untrusted run directories -----------------------------------------------------------------------------

def _copy_mixture(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoints", "data", "partition", "dense", "eval",
                                                           "report", "jobs", "lm"))
    return to


def test_mixture_paths_outside_the_run_are_refused(pipeline_run, tmp_path, capsys):
    """Was: mixture.json paths were not confined: `experts remove --delete` deleted what an absolute entry
    named, and loading followed `..` anywhere."""
    run = _copy_mixture(pipeline_run[0], tmp_path / "run")
    victim = tmp_path / "precious" / "model"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    manifest = json.loads((run / "mixture.json").read_text())
    for bad in (str(victim), "../precious/model"):
        edited = {**manifest, "expert_dirs": [bad, *manifest["expert_dirs"][1:]]}
        (run / "mixture.json").write_text(json.dumps(edited))
        with pytest.raises(SmalltalkError, match="outside the run"):
            RunLayout(run).mixture()
        assert cli("experts", "remove", "--run", run, "--expert", "0", "--delete") == 2
        assert "outside the run" in capsys.readouterr().err and (victim / "keep.txt").read_text() == "mine"


def test_export_refuses_links_out_of_the_run(pipeline_run, tmp_path, capsys):
    """Was: export followed a symlink in the run and copied whatever it pointed to into the export."""
    run = _copy_mixture(pipeline_run[0], tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's")
    (run / "experts" / "01" / "model" / "notes.txt").symlink_to(secret)
    assert cli("export", "--run", run, "--out", tmp_path / "export") == 2
    assert "outside the run" in capsys.readouterr().err and not (tmp_path / "export").exists()


def test_sbatch_lines_quote_the_run_path_and_refuse_what_cannot_be_quoted(pipeline_run, tmp_path):
    """Was: the run path went unquoted into #SBATCH lines (a space split the option)."""
    spaced = tmp_path / "my runs" / "run one"
    spaced.parent.mkdir()
    os.symlink(pipeline_run[0], spaced)
    script = slurm_script(RunLayout(spaced), "experts")
    output = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    assert output == f'#SBATCH --output="{spaced}/jobs/experts-%a.log"'
    quoted = tmp_path / 'a"b'
    os.symlink(pipeline_run[0], quoted)
    with pytest.raises(SmalltalkError, match="SBATCH"):
        slurm_script(RunLayout(quoted), "experts")


def test_torch_requirement_excludes_versions_whose_safe_load_can_be_bypassed():
    """Was: `torch>=2.4`; weights_only=True loading could run code before 2.6 (CVE-2025-32434)."""
    import tomllib

    from .conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps


# ---- corpus and instruction files with hostile JSON ---------------------------------------------------------

HOSTILE_LINES = {
    "lone surrogate": '{"text": "ab\\ud800cd", "domain": "x"}',
    "deep nesting": '{"text": "abc", "meta": ' + "[" * 10_000 + "]" * 10_000 + "}",
    "huge integer": '{"text": "abc", "n": ' + "9" * 10_000 + "}",
    "NaN": '{"text": "abc", "score": NaN}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
def test_hostile_corpus_lines_give_a_file_line_error(tmp_path, capsys, kind):
    """Was: tokenizer training and `data prepare` crashed with a traceback (UnicodeEncodeError in the
    tokenizer, RecursionError, ValueError) instead of the usual file:line error."""
    docs = [{"text": f"plain document number {i} " * 20, "domain": "x"} for i in range(30)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    with open(path, "a") as handle:
        handle.write(HOSTILE_LINES[kind] + "\n")
    common = ["--config", TINY_CONFIG, "--run", tmp_path / "run", "--set", "data.max_docs=null"]
    hostile = ["--set", f"data.inputs=[{path}]"]
    for verb in (["tokenizer", "train"], ["data", "prepare"]):
        if verb[0] == "data":  # a tokenizer from clean documents first, so that prepare reaches the bad line
            clean = write_jsonl(tmp_path / "clean.jsonl", docs)
            assert cli("tokenizer", "train", *common, "--set", f"data.inputs=[{clean}]") == 0
        capsys.readouterr()
        assert cli(*verb, *common, *hostile) == 2
        err = capsys.readouterr().err
        assert f"docs.jsonl:{len(docs) + 1}" in err and "Traceback" not in err, (verb, err)


@pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
def test_hostile_instruction_lines_give_a_file_line_error(tmp_path, kind):
    from smalltalk.sft.examples import read_examples

    line = HOSTILE_LINES[kind].replace('"text": "ab\\ud800cd"', '"prompt": "q\\udfff", "completion": "a"')
    line = line.replace('"text": "abc"', '"prompt": "q", "completion": "a"')
    (tmp_path / "i.jsonl").write_text('{"prompt": "q", "completion": "a"}\n' + line + "\n")
    with pytest.raises(SmalltalkError) as err:
        read_examples(tmp_path / "i.jsonl")
    assert "i.jsonl:2" in str(err.value)


def test_untrusted_json_parser_refuses_every_hostile_shape():
    from smalltalk.untrusted import BadInput, parse_json

    for text in ["[" * 10_000 + "]" * 10_000, "1" * 10_000, "NaN", "-Infinity", '"\\udc00"', '{"\\ud800": 1}']:
        with pytest.raises(BadInput):
            parse_json(text)
    assert parse_json('{"a": "\\ud83d\\ude00", "b": [[1]]}') == {"a": "\U0001F600", "b": [[1]]}
    assert np.isfinite(parse_json("1e308"))

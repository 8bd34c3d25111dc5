"""The shared trainer: HF-loadable checkpoints, exact resume after kill -9, torchrun, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smalltalk.config import TrainConfig
from smalltalk.training.trainer import lr_factor

from .conftest import ROOT, TINY_CONFIG, cli

TRAIN = ["--config", str(TINY_CONFIG)]


def _train_cmd(run: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smalltalk.cli", "train", "lm", *TRAIN, "--run", str(run), "--out", str(out),
            *extra]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_lr_schedules():
    cos = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, cos) == pytest.approx(0.1) and lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(10, cos) == pytest.approx(1.0) and lr_factor(110, cos) == pytest.approx(0.1)
    assert lr_factor(60, cos) == pytest.approx(0.55)
    const = TrainConfig(steps=110, warmup_steps=10, schedule="constant")
    assert lr_factor(100, const) == 1.0 and lr_factor(4, const) == pytest.approx(0.5)


def test_checkpoint_loads_with_automodel_and_same_logits(prepared_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from smalltalk.config import ModelConfig
    from smalltalk.llama import build_model, resolve_spec
    from smalltalk.training.checkpoint import latest_checkpoint, load_checkpoint

    out = tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    spec = resolve_spec(ModelConfig(preset="test-tiny"), 384)
    ours = build_model(spec, 64, seed=123)
    state = load_checkpoint(latest_checkpoint(out), ours)
    assert state["step"] == 20
    x = torch.randint(0, 384, (2, 64))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x).logits)
    manifest = json.loads((out / "train_manifest.json").read_text())
    assert manifest["tokens"] == 20 * 8 * 64 and manifest["training_flops"]["exact"] > 0
    losses = _losses(out)
    assert losses[-1] < losses[0]  # it learns
    # eval ppl on the same model agrees with a direct computation
    assert cli("eval", "ppl", "--model", out / "model", "--data", prepared_run / "data") == 0  # validation


def test_eval_ppl_matches_direct_computation(prepared_run, tmp_path):
    import math

    import numpy as np
    from transformers import AutoModelForCausalLM

    from smalltalk.data.shards import SplitData
    from smalltalk.training.nll import perplexity

    out = tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=5") == 0
    result = perplexity(out / "model", prepared_run / "data", "test", batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    data = SplitData(prepared_run / "data", "test")
    total, count = 0.0, 0
    for i in range(len(data)):
        x = torch.from_numpy(data[i].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
        total -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += x.shape[1] - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    after = perplexity(out / "model", prepared_run / "data", "test", first_target=16)
    assert after["tokens"] == len(data) * (64 - 16)


def test_gradient_accumulation_matches_bigger_micro_batch(prepared_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", a, "--set", "train.steps=10") == 0
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", b, "--set", "train.steps=10",
               "--set", "train.micro_batch_size=4", "--set", "train.grad_accum=2") == 0
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-4)
    # The weights, not only the log. Measured (2026-12-07): at most 3.4e-6 apart (float rounding of the sums);
    # a step on half the batch (micro 4, no accumulation) leaves them 1e-2 apart: the tolerance sits between.
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=5e-5), name


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_exact(prepared_run, tmp_path):
    settings = ["--set", "train.steps=60", "--set", "train.checkpoint_every=10"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(prepared_run, ref, *settings), check=True, cwd=ROOT)
    proc = subprocess.Popen(_train_cmd(prepared_run, killed, *settings), cwd=ROOT)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000020").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    subprocess.run(_train_cmd(prepared_run, killed, *settings, "--resume"), check=True, cwd=ROOT)
    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(ref) == _losses(killed)  # metrics past the checkpoint were rewritten, not duplicated
    state = Path("checkpoints") / "step_00000060" / "trainer_state.pt"  # optimizer, RNG, cursor: same bytes too
    assert (ref / state).read_bytes() == (killed / state).read_bytes()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(prepared_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--set", "train.steps=15", "--set", "train.log_every=1"]
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", one, *common) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "smalltalk.cli", "train", "lm",
                    *TRAIN, "--run-dir", str(prepared_run), "--out", str(two), *common,
                    "--set", "train.micro_batch_size=4"], check=True, cwd=ROOT, timeout=300)
    manifest = json.loads((two / "train_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 8
    # Same global batch, same data order: only float summation order differs.
    assert _losses(two) == pytest.approx(_losses(one), rel=2e-4)


def test_truncated_checkpoint_is_a_clear_error(prepared_run, tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=4") == 0
    weights = out / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = sorted(p.name for p in out.rglob("*"))
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=8",
               "--resume") == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and str(weights) in err and "delete" in err
    assert sorted(p.name for p in out.rglob("*")) == before


class _Payload:
    """Unpickling this would create `path`: the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_trainer_state_is_never_run_on_resume(prepared_run, tmp_path, capsys):
    """A trainer_state.pt replaced by a pickle that runs code when loaded (someone else's run directory):
    resume refuses it with the usual damaged-checkpoint error and the payload never runs."""
    import pickle

    out, marker = tmp_path / "lm", tmp_path / "pwned"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=2",
               "--set", "train.checkpoint_every=2") == 0
    state = out / "checkpoints" / "step_00000002" / "trainer_state.pt"
    torch.save({"step": 2, "payload": _Payload(str(marker))}, state, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    capsys.readouterr()
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=4",
               "--set", "train.checkpoint_every=2", "--resume") == 2
    err = capsys.readouterr().err
    assert "trainer state is unreadable" in err and str(state) in err
    assert not marker.exists(), "unpickling the trainer state ran code"


def test_vocab_model_mismatch_is_a_clear_error(prepared_run, tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "model.vocab_size=512") == 2
    err = capsys.readouterr().err
    assert "vocab/model mismatch" in err and "512" in err and "384" in err
    assert not out.exists()


def test_existing_checkpoints_need_resume(prepared_run, tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=2") == 0
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=2") == 2
    assert "--resume" in capsys.readouterr().err


def test_bf16_autocast_runs_on_cpu(prepared_run, tmp_path):
    """bf16 autocast really runs (losses differ from fp32's in their rounding) and trains the same model
    (every loss within bf16 rounding of fp32's), with fp32 master weights saved."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=3",
                   "--set", f"train.dtype={dtype}", "--set", "train.log_every=1") == 0
        runs[dtype] = _losses(out)
    assert len(runs["bfloat16"]) == 3
    assert runs["bfloat16"] != runs["float32"], "the bf16 run computed exactly fp32's losses: autocast was off"
    assert runs["bfloat16"] == pytest.approx(runs["float32"], rel=2e-2)
    weights = load_file(str(tmp_path / "bfloat16" / "model" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_sampler_is_a_cursor_over_a_seeded_order():
    """Each epoch draws every id once; the state is (epoch, position), whatever the number of ids, and a
    restored cursor continues the same stream."""
    import numpy as np

    from smalltalk.training.trainer import Sampler

    ids = np.arange(1000, 1037)
    a = Sampler(ids, 8, seed=3)
    epoch = np.concatenate([a.next_batch() for _ in range(4)])  # 32 of the 37 ids
    assert len(np.unique(epoch)) == 32 and np.isin(epoch, ids).all()
    assert np.array_equal(a.consumed(), np.sort(epoch))
    b = Sampler(ids, 8, seed=3)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next_batch(), b.next_batch())
    assert set(a.state_dict()) == {"fingerprint", "epoch", "pos"}
    big = Sampler(10**9, 4, seed=0)  # a whole 10^9-sequence split: no id array, no permutation array
    first = big.next_batch()
    assert len(set(first.tolist())) == 4 and first.max() < 10**9 and big.state_dict()["pos"] == 4
    assert Sampler(ids, 8, seed=3).next_batch().tolist() != Sampler(ids, 8, seed=4).next_batch().tolist()
    a.next_batch()  # crosses into epoch 1: everything has been drawn
    assert a.state_dict()["epoch"] == 1 and np.array_equal(a.consumed(), ids)


def test_a_kill_between_a_save_and_its_pruning_leaves_no_extra_checkpoint(prepared_run, tmp_path):
    """Killed after the last checkpoint's save but before the older ones were pruned, a resumed trainer has no
    step left to save at: it prunes when it resumes, and ends with the checkpoints of an uninterrupted run."""
    every = ["--set", "train.checkpoint_every=2", "--set", "train.steps=10"]
    ref, out = tmp_path / "ref", tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", ref, *every) == 0
    # the pruning that the kill prevented: one checkpoint more than keep_checkpoints (2)
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, *every,
               "--set", "train.keep_checkpoints=3") == 0
    assert len(list((out / "checkpoints").iterdir())) == 3
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, *every, "--resume") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(prepared_run, tmp_path, capsys):
    """The newest checkpoint is truncated: resume warns, names both, continues from the older one, and still
    ends bitwise equal to an uninterrupted run (exact resume)."""
    every = ["--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3"]
    ref, out = tmp_path / "ref", tmp_path / "lm"
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", ref, "--set", "train.steps=10", *every) == 0
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=6", *every) == 0
    weights = out / "checkpoints" / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert cli("train", "lm", *TRAIN, "--run", prepared_run, "--out", out, "--set", "train.steps=10", *every,
               "--resume") == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(weights) in err and "step_00000004" in err
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Where experts start (experts/start.py): a shared trunk or a pretrained checkpoint instead of random weights,
with the dense baselines starting from the same place and the trunk's FLOPs in the mixture's budget."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smalltalk.config import load_config
from smalltalk.layout import RunLayout, TrainFiles
from smalltalk.llama import ModelSpec, build_model
from smalltalk.run.plan import plan, resources
from smalltalk.run.status import run_status

from .conftest import ROOT, TINY_CONFIG, cli, make_documents, write_jsonl


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def _checkpoint(out: Path, tokenizer_dir: Path, vocab: int | None = None) -> Path:
    """A small HF Llama checkpoint written here (no hub): random weights, a RoPE base and norm epsilon other
    than ours (so the experts' architecture must come from it), bf16 on disk, the given tokenizer beside it."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    spec = ModelSpec(32, 2, 2, 64, vocab_size=vocab or len(hf), rope_theta=50000.0, rms_norm_eps=1e-6)
    model = build_model(spec, max_positions=128, seed=123).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    hf.save_pretrained(str(out))
    return out


def _run_args(run: Path, corpus: Path, *extra: str) -> list:
    return ["run", "--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus}]", "--set",
            "data.max_docs=null", "--set", "routing.chunk=240", "--set", "eval.max_sequences=16", *extra]


@pytest.mark.slow
def test_pretrained_start_every_expert_and_the_dense_model_begin_at_its_weights(prepared_run, corpus_file, tmp_path):
    """lr = 0 keeps every job at its starting weights: each expert and the matched dense model must then hold
    the checkpoint's tensors exactly, in its architecture; the run's tokenizer is the checkpoint's."""
    ckpt = _checkpoint(tmp_path / "pretrained", RunLayout(prepared_run).tokenizer)
    run = RunLayout(tmp_path / "run")
    assert cli(*_run_args(run.root, corpus_file, "--set", "experts.init=pretrained", "--set",
                          f"experts.pretrained={ckpt}", "--set", "train.lr=0")) == 0
    theirs = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((run.tokenizer / "tokenizer.json").read_text())["model"]["vocab"] == theirs
    start = _weights(ckpt)
    for k in range(2):
        model = TrainFiles(run.expert(k)).model
        assert _same(_weights(model), start), k
        config = json.loads((model / "config.json").read_text())
        assert config["rms_norm_eps"] == 1e-6 and config["num_hidden_layers"] == 2
    assert _same(_weights(TrainFiles(run.dense_kind("matched")).model), start)
    assert not run.dense_kind("bigger").exists()  # it could not start from the same weights: not trained
    assert run_status(run)["stages"]["trunk"] == "unused (pretrained start)"


def test_a_directory_that_is_not_a_llama_checkpoint_is_one_clear_error(prepared_run, tmp_path, capsys):
    common = ["--config", TINY_CONFIG, "--run", tmp_path / "run", "--set", "experts.init=pretrained"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("tokenizer", "train", *common, "--set", f"experts.pretrained={empty}") == 2
    assert "no config.json" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    assert cli("tokenizer", "train", *common, "--set", f"experts.pretrained={gpt2}") == 2
    err = capsys.readouterr().err
    assert "not a plain Llama checkpoint" in err and "gpt2" in err
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_a_checkpoint_whose_tokenizer_or_vocabulary_differs_from_the_run_is_refused(prepared_run, tmp_path, capsys):
    """The run's data were encoded with another tokenizer (same size, other ids), or the embeddings have other
    rows than the tokenizer has tokens: refused before any data is read."""
    other_run = tmp_path / "other"
    other_corpus = write_jsonl(tmp_path / "other.jsonl", make_documents(90, seed=5))
    assert cli("tokenizer", "train", "--config", TINY_CONFIG, "--run", other_run, "--set",
               f"data.inputs=[{other_corpus}]", "--set", "data.max_docs=null") == 0
    cases = {"differs from the run's": _checkpoint(tmp_path / "a", RunLayout(other_run).tokenizer),
             "embedding rows": _checkpoint(tmp_path / "b", RunLayout(prepared_run).tokenizer, vocab=400)}
    for message, ckpt in cases.items():
        assert cli("experts", "train", "--expert", "0", "--config", TINY_CONFIG, "--run", prepared_run, "--set",
                   "experts.init=pretrained", "--set", f"experts.pretrained={ckpt}") == 2
        assert message in capsys.readouterr().err
    assert not RunLayout(prepared_run).expert(0).exists()


@pytest.mark.slow
def test_trunk_experts_and_dense_branch_from_it_and_its_flops_count(corpus_file, tmp_path):
    """lr = 0: the trunk keeps its seeded init, and every expert (an added one too) and the matched dense model
    must equal it, not their own random inits. Its FLOPs are in the mixture's budget: the experts' steps
    shrink so that trunk + experts = the scratch experts' budget, and `bigger` trains for all of it."""
    run = RunLayout(tmp_path / "run")
    assert cli(*_run_args(run.root, corpus_file, "--set", "experts.init=trunk", "--set",
                          "experts.trunk_fraction=0.25", "--set", "train.lr=0", "--set", "dense.from_trunk=true")) == 0
    trunk = TrainFiles(run.trunk).summary()
    assert trunk["steps"] == 10  # 0.25 x 2 experts x 20 steps
    start = _weights(TrainFiles(run.trunk).model)
    experts = [TrainFiles(run.expert(k)).summary() for k in range(2)]
    assert [e["steps"] for e in experts] == [15, 15]
    for k in range(2):
        assert _same(_weights(TrainFiles(run.expert(k)).model), start), k
    assert _same(_weights(TrainFiles(run.dense_kind("matched-trunk")).model), start)
    assert not _same(_weights(TrainFiles(run.dense_kind("matched")).model), start)  # the headline: from scratch
    results = json.loads(run.results_file(run.eval).read_text())["flops"]["exact"]
    per_step = trunk["training_flops"]["exact"] / trunk["steps"]
    assert results["trunk_training"] + results["experts_training"] == pytest.approx(2 * 20 * per_step)
    for kind in ("matched", "matched-trunk"):  # matched: the whole budget; matched-trunk: what is left after it
        assert results["dense_budget_ratio"][kind] == pytest.approx(1, abs=per_step / results["mixture_training"])
    assert results["dense_training"]["matched"] == pytest.approx(results["mixture_training"], rel=0.05)
    assert results["dense_training"]["bigger"] == pytest.approx(results["mixture_training"], rel=0.05)
    assert run_status(run)["stages"]["trunk"] == "done"
    assert run_status(run)["experts"][0]["target_steps"] == 15

    new_docs = write_jsonl(tmp_path / "new.jsonl", make_documents(60, seed=11))
    assert cli("experts", "add", "--run", run.root, "--data", new_docs, "--steps", "5", "--router-steps", "5") == 0
    assert _same(_weights(TrainFiles(run.expert(2)).model), start)  # branched from the same trunk


def _trunk_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "smalltalk.cli", "trunk", "train", "--config", str(TINY_CONFIG), "--run", str(run),
            "--set", "experts.init=trunk", "--set", "train.steps=120", "--set", "train.checkpoint_every=10"]


@pytest.mark.slow
def test_a_trunk_killed_mid_way_resumes_to_the_same_weights(prepared_run, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for run in (ref, killed):
        shutil.copytree(prepared_run, run)
    subprocess.run(_trunk_cmd(ref), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(_trunk_cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "trunk" / "checkpoints" / "step_00000020").exists():
        assert proc.poll() is None and time.time() < deadline, "the trunk ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_status(RunLayout(killed))["stages"]["trunk"].startswith("running")
    out = subprocess.run(_trunk_cmd(killed), check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert "trunk: resuming from" in out
    assert _same(_weights(ref / "trunk" / "model"), _weights(killed / "trunk" / "model"))
    assert TrainFiles(killed / "trunk").summary()["steps"] == 60


def test_start_settings_are_checked_when_the_config_loads(tmp_path):
    from smalltalk.errors import SmalltalkError

    for bad, message in ((["experts.init=seed"], "experts.init"),
                         (["experts.init=trunk", "experts.trunk_fraction=0"], "trunk_fraction"),
                         (["experts.init=pretrained"], "needs experts.pretrained"),
                         (["experts.init=pretrained", f"experts.pretrained={tmp_path / 'none'}"], "no such directory"),
                         ([f"experts.pretrained={tmp_path}"], "would be ignored")):
        with pytest.raises(SmalltalkError, match=message):
            load_config(TINY_CONFIG, bad)


def test_plan_lists_the_trunk_and_keeps_the_total_budget():
    scratch = plan(load_config(TINY_CONFIG))
    trunk_cfg = load_config(TINY_CONFIG, ["experts.init=trunk", "experts.trunk_fraction=0.5"])
    trunk = plan(trunk_cfg)
    assert trunk["jobs"][0].startswith("trunk: 20 steps")  # 0.5 x 2 experts x 20 steps
    assert trunk["trunk_training_flops"] + trunk["experts_training_flops"] == pytest.approx(
        scratch["experts_training_flops"])
    assert trunk["total_training_flops"] == pytest.approx(
        trunk["trunk_training_flops"] + trunk["experts_training_flops"] + trunk["router_overhead_flops"])
    rows = {r["stage"]: r for r in resources(trunk_cfg, 989e12, 0.4)}
    assert rows["trunk"]["hours"] == pytest.approx(rows["each expert job"]["hours"] * 20 / 10)


def test_a_sharded_checkpoint_is_a_starting_point_too(prepared_run, tmp_path):
    """Large checkpoints come as safetensors shards with an index: the start loads every shard."""
    from transformers import LlamaForCausalLM

    from smalltalk.config import TrainConfig
    from smalltalk.data.shards import SplitData
    from smalltalk.llama import pretrained_spec
    from smalltalk.training.trainer import TrainJob, train

    whole = _checkpoint(tmp_path / "whole", RunLayout(prepared_run).tokenizer)
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(str(whole)).save_pretrained(str(sharded), max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    data = SplitData(RunLayout(prepared_run).data, "train")
    cfg = TrainConfig(steps=1, lr=0.0, warmup_steps=1, micro_batch_size=2, tensorboard=False, progress=False,
                      num_threads=1)
    train(TrainJob(pretrained_spec(sharded, data.vocab_size), cfg, data, tmp_path / "job", init_from=sharded))
    assert _same(_weights(tmp_path / "job" / "model"), _weights(whole))


def test_an_expert_without_its_trunk_stops_before_reading_data(prepared_run, capsys):
    assert cli("experts", "train", "--expert", "0", "--config", TINY_CONFIG, "--run", prepared_run, "--set",
               "experts.init=trunk") == 2
    err = capsys.readouterr().err
    assert "holds no finished trunk" in err and "smalltalk trunk train" in err
    assert not RunLayout(prepared_run).expert(0).exists()


def test_the_trunk_launches_as_a_job_locally_and_on_slurm(prepared_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    common = ["--config", TINY_CONFIG, "--run", run, "--set", "experts.init=trunk"]
    assert cli("launch", *common, "--stage", "trunk", "--scheduler", "slurm", "--gpus-per-expert", "4") == 0
    script = (run / "jobs" / "trunk.sbatch").read_text()
    subprocess.run(["bash", "-n", str(run / "jobs" / "trunk.sbatch")], check=True)
    assert "--array" not in script  # one job, over the node's GPUs
    assert f"torchrun --standalone --nproc_per_node 4 -m smalltalk.cli trunk train --run-dir {run}" in script
    assert cli("launch", *common, "--stage", "trunk", "--scheduler", "local") == 0
    assert TrainFiles(run / "trunk").done(10) and run_status(RunLayout(run))["stages"]["trunk"] == "done"


def test_the_shipped_configs_start_experts_where_the_validation_study_chose():
    """The trunk at a quarter of the budget beat scratch on validation at E = 4 and 8 on both corpora
    (docs/experts-start.md), so the CPU configs branch from it; the paper's configs and the library's default
    keep the paper's start."""
    for name in ("demo", "corpus10"):
        experts = load_config(ROOT / "configs" / f"{name}.yaml").experts
        assert (experts.init, experts.trunk_fraction) == ("trunk", 0.25), name
    for name in ("tiny", "paper-335m", "paper-1.3b"):
        assert load_config(ROOT / "configs" / f"{name}.yaml").experts.init == "scratch", name


def test_plan_sizes_a_pretrained_start_from_its_checkpoint(prepared_run, tmp_path):
    from smalltalk.llama import count_params, pretrained_spec

    ckpt = _checkpoint(tmp_path / "pretrained", RunLayout(prepared_run).tokenizer)
    result = plan(load_config(TINY_CONFIG, ["experts.init=pretrained", f"experts.pretrained={ckpt}"]))
    assert result["expert_params"] == count_params(pretrained_spec(ckpt))  # 2 layers here, test-tiny has 1
    assert f"from {ckpt}" in result["jobs"][-1] and result["trunk_training_flops"] == 0

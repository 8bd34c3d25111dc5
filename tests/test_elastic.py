"""Elastic experts: add a pair for a new domain, remove a pair; the others stay untouched."""

import json
import random
import shutil

import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.experts.elastic import routing_shift
from smalltalk.fsutil import sha256_file
from smalltalk.mixture.model import SmallTalkMixture

from .conftest import cli, write_jsonl

pytestmark = pytest.mark.slow


def new_domain_docs(n_docs: int = 60, seed: int = 7) -> list[dict]:
    """A fourth domain whose alphabet (upper case) the three original domains never use."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("QWERTYUIOP") for _ in range(rng.randint(2, 6))) for _ in range(80)]
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(80, 200))), "domain": "upper",
             "source": f"new-{i}"} for i in range(n_docs)]


def _weights(run, rel: str) -> str:
    return sha256_file(run / rel / "model.safetensors")


def test_an_added_router_trains_as_many_steps_as_the_em_routers(pipeline_run, tmp_path):
    """Not rounds x routing.train.steps: with the paper's one-pass M-step (routing.share_passes) the EM routers'
    steps per round come from the chunk, so the count is read from their own manifests."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run)
    em_steps = json.loads((run / "routers" / "00" / "train_manifest.json").read_text())["steps"]
    assert cli("experts", "add", "--run", run, "--data", write_jsonl(tmp_path / "new.jsonl", new_domain_docs(30)),
               "--set", "routing.train.steps=3", "--set", "train.steps=4") == 0
    assert json.loads((run / "routers" / "03" / "train_manifest.json").read_text())["steps"] == em_steps != 3 * 2


def test_add_then_remove_expert(pipeline_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run)
    new_docs = write_jsonl(tmp_path / "new.jsonl", new_domain_docs())
    before = json.loads((run / "mixture.json").read_text())
    old_weights = {rel: _weights(run, rel) for rel in before["expert_dirs"]}
    untouched = {p: sha256_file(p) for d in ("routers", "partition") for p in sorted((run / d).rglob("*"))
                 if p.is_file()}
    assert (run / "routers" / "em_history.json") in untouched and (run / "partition" / "manifest.json") in untouched

    assert cli("experts", "add", "--run", run, "--data", new_docs, "--router-steps", "40",
               "--set", "data.validation_fraction=0.2", "--set", "data.test_fraction=0.2") == 0
    printed = capsys.readouterr().out
    assert "added pair 03 as mixture expert 3" in printed
    after = json.loads((run / "mixture.json").read_text())
    assert after["experts"] == 4 and after["expert_dirs"][:3] == before["expert_dirs"]
    assert after["router_dirs"][-1] == "routers/03/model" and "pending_add" not in after
    assert {rel: _weights(run, rel) for rel in before["expert_dirs"]} == old_weights  # others untouched
    now = {p: sha256_file(p) for p in untouched if p.is_file()}
    assert now == untouched, "experts add changed the run's routers, partition or EM history"
    assert not list((run / "added").glob("*/pending.json"))
    # the same documents again: recognised by their checksum, not added twice
    assert cli("experts", "add", "--run", run, "--data", new_docs, "--router-steps", "40") == 2
    assert "already added as pair 03" in capsys.readouterr().err
    assert json.loads((run / "mixture.json").read_text()) == after

    # The new expert trained only on the new documents, and the new domain is routed to it.
    new_data = SplitData(run / "added" / "03" / "data", "train")
    consumed = np.load(run / "experts" / "03" / "consumed_ids.npy")
    assert consumed.max() < len(new_data)
    new_val = SplitData(run / "added" / "03" / "data", "validation")
    shift = routing_shift(run, before, after, new_val, np.arange(len(new_val)), before["prefix"])
    assert (shift["chosen_after"] == "experts/03/model").mean() > 0.8
    old_val = SplitData(run / "data", "validation")
    old_shift = routing_shift(run, before, after, old_val, np.arange(len(old_val)), before["prefix"])
    assert old_shift["changed"] < 0.2  # calibration: old text mostly keeps its expert

    assert cli("status", run) == 0
    assert "03 (added) | done" in capsys.readouterr().out
    mixture = SmallTalkMixture.from_pretrained(run)
    chosen, scores = mixture.route(new_val.batch(np.arange(4)), before["prefix"])
    assert scores.shape == (4, 4) and np.array_equal(chosen, scores.argmax(axis=1))
    assert cli("eval", "--config", run / "config.json", "--run", run) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["experts"] == 4 and len(results["tokens_per_param"]["experts"]) == 4
    trained = sum(json.loads((run / "experts" / f"{k:02d}" / "train_manifest.json").read_text())["training_flops"]
                  ["exact"] for k in range(4))
    assert results["flops"]["exact"]["experts_training"] == pytest.approx(trained)  # the added expert counts
    # ... and on the new domain's own test split, written beside, not over, RUN/eval
    new_dir = run / "added" / "03" / "data"
    assert cli("eval", "--config", run / "config.json", "--run", run, "--data", new_dir,
               "--out", tmp_path / "eval-new") == 0
    on_new = json.loads((tmp_path / "eval-new" / "results.json").read_text())
    cap = json.loads((run / "config.json").read_text())["eval"]["max_sequences"] or 10**9
    assert on_new["data"] == str(new_dir) and on_new["sequences"] == min(cap, len(SplitData(new_dir, on_new["split"])))
    at_main = next(r for r in on_new["sweep"] if r["prefix"] == on_new["main_prefix"])
    assert at_main["loads"][3] > 0.8 * on_new["sequences"]
    other = tmp_path / "other-tokenizer"
    shutil.copytree(new_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": "0" * 64}))
    capsys.readouterr()
    assert cli("eval", "--config", run / "config.json", "--run", run, "--data", other,
               "--out", tmp_path / "eval-other") == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "eval-other").exists()

    assert cli("experts", "remove", "--run", run, "--expert", "3") == 0
    removed = json.loads((run / "mixture.json").read_text())
    assert removed["expert_dirs"] == before["expert_dirs"] and removed["experts"] == 3
    back = routing_shift(run, before, removed, old_val, np.arange(len(old_val)), before["prefix"])
    assert back["changed"] == 0.0
    assert (run / "experts" / "03" / "model").is_dir()  # kept on disk without --delete
    now = {p: sha256_file(p) for p in untouched if p.is_file()}
    assert now == untouched, "experts remove changed the run's routers, partition or EM history"

    assert cli("experts", "remove", "--run", run, "--expert", "7") == 2
    assert "does not exist" in capsys.readouterr().err


def test_add_then_remove_with_ngram_routers(ngram_run, tmp_path, capsys):
    """routing.method=ngram: the new router counts the new domain's prefixes, scaled to the others' counted
    weight; the new domain goes to the new expert, old text mostly keeps its expert, the run's tables and
    partition stay byte-identical, the grown mixture exports as one Hugging Face model that routes as the
    package does, and removing the pair routes everything as before."""
    from smalltalk.layout import RunLayout
    from smalltalk.mixture.export_hf import build_hf_model
    from smalltalk.routing.ngram import NgramRouters

    run = tmp_path / "run"
    shutil.copytree(ngram_run, run)
    before = json.loads((run / "mixture.json").read_text())
    untouched = {p: sha256_file(p) for d in ("routers", "partition") for p in sorted((run / d).rglob("*"))
                 if p.is_file()}
    docs = write_jsonl(tmp_path / "new.jsonl", new_domain_docs())
    assert cli("experts", "add", "--run", run, "--data", docs, "--router-steps", "40") == 2
    assert "they do not train" in capsys.readouterr().err
    assert not (run / "routers" / "00").exists() and not (run / "added").exists()  # nothing written
    assert cli("experts", "add", "--run", run, "--data", docs, "--set", "data.validation_fraction=0.2",
               "--set", "data.test_fraction=0.2") == 0
    assert "added pair 03 as mixture expert 3: router counted" in capsys.readouterr().out
    after = json.loads((run / "mixture.json").read_text())
    assert after["router_dirs"] == [f"routers/{k:02d}/model" for k in range(4)] and after["experts"] == 4
    assert {p: sha256_file(p) for p in untouched} == untouched, "experts add changed the run's tables or partition"
    tables = NgramRouters.stack([NgramRouters.load(run / rel) for rel in after["router_dirs"]])
    assert tables.mass()[3] == pytest.approx(tables.mass()[:3].mean(), rel=1e-4)  # calibrated to the others

    new_val = SplitData(run / "added" / "03" / "data", "validation")
    shift = routing_shift(run, before, after, new_val, np.arange(len(new_val)), before["prefix"])
    assert (shift["chosen_after"] == "experts/03/model").mean() > 0.8
    old_val = SplitData(run / "data", "validation")
    assert routing_shift(run, before, after, old_val, np.arange(len(old_val)), before["prefix"])["changed"] < 0.2

    import torch

    ids = np.concatenate([new_val.batch(np.arange(4), 16), old_val.batch(np.arange(8), 16)])
    model = build_hf_model(RunLayout(run))
    with torch.no_grad():
        experts, _, scores = model.route(torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long))
    chosen, mine = SmallTalkMixture.from_pretrained(run).route(ids, 16)
    assert experts[:, 0].tolist() == chosen.tolist() and 3 in chosen.tolist()
    np.testing.assert_allclose(scores.numpy(), mine, rtol=1e-6)

    assert cli("experts", "remove", "--run", run, "--expert", "3") == 0
    removed = json.loads((run / "mixture.json").read_text())
    assert routing_shift(run, before, removed, old_val, np.arange(len(old_val)), before["prefix"])["changed"] == 0.0


def test_add_refuses_non_em_mixture(pipeline_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run)
    manifest = json.loads((run / "mixture.json").read_text())
    (run / "mixture.json").write_text(json.dumps({**manifest, "method": "random"}))
    docs = write_jsonl(tmp_path / "new.jsonl", new_domain_docs(10))
    assert cli("experts", "add", "--run", run, "--data", docs) == 2
    assert "needs one router per expert" in capsys.readouterr().err
    assert not (run / "added").exists()


@pytest.mark.slow
def test_killed_add_resumes_and_mixture_changes_only_when_done(pipeline_run, tmp_path):
    """SIGKILL `experts add` once the new router has a checkpoint: mixture.json is untouched, and the same
    command finishes the pair from its checkpoints, with the weights of an uninterrupted add."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    docs = write_jsonl(tmp_path / "new.jsonl", new_domain_docs())
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    for run in runs.values():
        shutil.copytree(pipeline_run[0], run)
    cmd = [sys.executable, "-m", "smalltalk.cli", "experts", "add", "--data", str(docs), "--router-steps", "40",
           "--set", "routing.train.checkpoint_every=10"]
    subprocess.run([*cmd, "--run", str(runs["whole"])], check=True, cwd=ROOT, timeout=600)
    before = (runs["killed"] / "mixture.json").read_text()
    proc = subprocess.Popen([*cmd, "--run", str(runs["killed"])], cwd=ROOT, start_new_session=True)
    deadline = time.time() + 300
    while not list((runs["killed"] / "routers" / "03" / "checkpoints").glob("step_*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (runs["killed"] / "mixture.json").read_text() == before
    subprocess.run([*cmd, "--run", str(runs["killed"])], check=True, cwd=ROOT, timeout=600)
    done = json.loads((runs["killed"] / "mixture.json").read_text())
    assert done["experts"] == 4 and done == {**json.loads((runs["whole"] / "mixture.json").read_text()),
                                             "elastic": done["elastic"]}
    for rel in ("routers/03/model", "experts/03/model"):
        assert _weights(runs["killed"], rel) == _weights(runs["whole"], rel), rel


def test_removing_an_original_expert_routes_among_the_others_and_leaves_the_run(pipeline_run, tmp_path):
    """`experts remove --expert 0` of the partition's own experts: mixture.json drops expert 0 and its router;
    routers/, partition/ and em_history.json stay byte-identical; every sequence is routed to one of the
    remaining experts, by the same router scores (the argmax over the remaining routers)."""
    from smalltalk.mixture.model import SmallTalkMixture

    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run)
    untouched = {p: sha256_file(p) for d in ("routers", "partition") for p in sorted((run / d).rglob("*"))
                 if p.is_file()}
    full = SmallTalkMixture.from_pretrained(run)
    val = SplitData(run / "data", "validation")
    tokens = val.batch(np.arange(min(40, len(val))))
    _, scores = full.route(tokens)
    assert cli("experts", "remove", "--run", run, "--expert", "0") == 0
    removed = json.loads((run / "mixture.json").read_text())
    assert removed["experts"] == 2 and removed["expert_dirs"] == ["experts/01/model", "experts/02/model"]
    assert {p: sha256_file(p) for p in untouched} == untouched
    chosen, _ = SmallTalkMixture.from_pretrained(run).route(tokens)
    assert chosen.tolist() == (scores[:, 1:].argmax(axis=1)).tolist()

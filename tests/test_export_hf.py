"""`smalltalk export` (the Hugging Face layout, mixture/export_hf.py + hub/): one directory that transformers alone
loads with trust_remote_code=True, in a process where our package cannot be imported; its forward, generate,
streamer, pipeline and lm-eval's `hf` model give what the package gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smalltalk.mixture.model import SmallTalkMixture

from .conftest import cli, make_documents
from .test_lm_eval import TASK

pytestmark = pytest.mark.slow

# Run in a child whose sys.path has no entry that holds our package: what a user without it has.
CLEAN = """
import sys
sys.path = [p for p in sys.path if not __import__("os").path.isdir(__import__("os").path.join(p, "smalltalk"))]
import importlib.util
assert importlib.util.find_spec("smalltalk") is None, "our package is importable"
"""


def _child(script: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", CLEAN + script], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def hf_export(pipeline_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "mixture"
    assert cli("export", "--run", pipeline_run[0], "--out", out) == 0
    return out


def _prompts(n: int = 6) -> list[str]:
    """Texts of the synthetic domains, of different lengths (some shorter than the routing prefix)."""
    docs = make_documents(30, seed=5)
    return [" ".join(d["text"].split()[:4 + 5 * i]) for i, d in enumerate(docs[:n])]


def test_the_directory_has_the_hub_layout(hf_export):
    config = json.loads((hf_export / "config.json").read_text())
    assert config["model_type"] == "smalltalk_mixture" and config["num_experts"] == 3
    assert config["auto_map"] == {"AutoConfig": "configuration_smalltalk.SmallTalkConfig",
                                  "AutoModelForCausalLM": "modeling_smalltalk.SmallTalkForCausalLM"}
    assert config["routing_prefix"] == 16 and config["routing_dtype"] == "float32" and config["routing_top_k"] == 1
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "configuration_smalltalk.py", "modeling_smalltalk.py"):
        assert (hf_export / name).is_file(), name
    code = (hf_export / "modeling_smalltalk.py").read_text()
    assert code == (Path(__file__).parents[1] / "src/smalltalk/hub/modeling_smalltalk.py").read_text()
    assert "smalltalk." not in code.replace("smalltalk.hub", "")  # imports torch and transformers only
    assert "SmallTalk LM" in (hf_export / "README.md").read_text()


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_routes_each_row_by_its_own_prefix_and_equals_the_package(hf_export, pipeline_run, tmp_path, side):
    """A padded batch whose rows go to different experts: each row's routed expert and per-token NLL equal
    SmallTalkMixture.route / .score of that row alone, to 1e-5; the loss is the mean over real tokens."""
    prompts = _prompts()
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    _child(f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(hf_export)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(hf_export)!r}, trust_remote_code=True, padding_side={side!r})
batch = tok(json.load(open("prompts.json")), return_tensors="pt", padding=True, add_special_tokens=False)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
with torch.no_grad():
    out = model(**batch, labels=labels)
torch.save({{"logits": out.logits, "experts": out.routed_experts, "loss": out.loss, **batch}}, "out.pt")
""", tmp_path)
    got = torch.load(tmp_path / "out.pt")
    mixture = SmallTalkMixture.from_pretrained(pipeline_run[0])
    assert got["experts"].shape == (len(prompts), 1)
    nll_sum, count = 0.0, 0
    for i, prompt in enumerate(prompts):
        ids = mixture.tokenizer(prompt, add_special_tokens=False).input_ids
        real = got["attention_mask"][i].bool()
        nll, chosen = mixture.score([ids], 16)
        assert got["experts"][i, 0] == int(chosen[0]), i
        logp = torch.log_softmax(got["logits"][i][real].double(), -1)
        mine = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        assert torch.allclose(mine, nll[0].double(), atol=1e-5, rtol=1e-5), i
        nll_sum, count = nll_sum + float(nll[0].sum()), count + len(ids) - 1
    assert len(set(got["experts"][:, 0].tolist())) > 1, "the batch must mix experts"
    labels = got["input_ids"].masked_fill(got["attention_mask"] == 0, -100)  # as any HF causal LM: shift inside
    hf_loss = torch.nn.functional.cross_entropy(got["logits"][:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert float(got["loss"]) == pytest.approx(float(hf_loss), rel=1e-6)
    if side == "right":  # no label is predicted from a pad: the mean NLL of the package's rows
        assert float(got["loss"]) == pytest.approx(nll_sum / count, rel=1e-5)


def test_generate_greedy_sampling_streamer_and_pipeline(hf_export, pipeline_run, tmp_path):
    """Batched greedy generation (left padding, rows on different experts) equals `smalltalk generate` of each
    prompt token for token; seeded sampling repeats; TextIteratorStreamer streams the same text; the
    text-generation pipeline answers; the KV caches are used (the step after the prompt feeds one token)."""
    prompts = _prompts(4)[1:]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    _child(f"""
import json, threading, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline
d = {str(hf_export)!r}
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True, padding_side="left")
prompts = json.load(open("prompts.json"))
batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
fed = []
forward = model.forward
model.forward = lambda *a, **k: (fed.append(k["input_ids"].shape[1]), forward(*a, **k))[1]
greedy = model.generate(**batch, max_new_tokens=12, do_sample=False)
texts = tok.batch_decode(greedy[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
samples = []
for _ in range(2):
    torch.manual_seed(3)
    samples.append(model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=20).tolist())
streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
one = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
thread = threading.Thread(target=model.generate, kwargs=dict(**one, max_new_tokens=12, do_sample=False,
                                                             streamer=streamer))
thread.start()
streamed = "".join(streamer)
thread.join()
piped = pipeline("text-generation", model=d, trust_remote_code=True)(prompts[0], max_new_tokens=5)
json.dump({{"texts": texts, "samples": samples, "streamed": streamed, "fed": fed,
           "piped": piped[0]["generated_text"]}}, open("gen.json", "w"))
""", tmp_path)
    got = json.loads((tmp_path / "gen.json").read_text())
    mixture = SmallTalkMixture.from_pretrained(pipeline_run[0])
    mine = [mixture.generate(p, max_new_tokens=12) for p in prompts]
    assert len({m["expert"] for m in mine}) > 1, "the batch must mix experts"
    assert got["texts"] == [m["text"] for m in mine]
    assert got["samples"][0] == got["samples"][1]
    assert got["streamed"] == mine[0]["text"]
    assert got["piped"].startswith(prompts[0]) and len(got["piped"]) > len(prompts[0])
    assert got["fed"][0] > 1 and set(got["fed"][1:12]) == {1}, got["fed"]  # prompt once, then one token a step


def test_top_k_export_mixes_the_k_best_experts(pipeline_run, tmp_path):
    """--top-k 2: every row uses its two best experts; its logits are log-probabilities of their mix, the
    weights softmax(score / T) of the two scores."""
    out = tmp_path / "top2"
    assert cli("export", "--run", pipeline_run[0], "--out", out, "--top-k", "2", "--temperature", "4") == 0
    assert cli("export", "--run", pipeline_run[0], "--out", tmp_path / "bad", "--top-k", "9") == 2
    from smalltalk.layout import RunLayout
    from smalltalk.mixture.export_hf import build_hf_model

    model = build_hf_model(RunLayout(pipeline_run[0]), 2, 4.0)
    ids = torch.tensor([SmallTalkMixture.from_pretrained(pipeline_run[0]).tokenizer(
        _prompts()[5], add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model(input_ids=ids)
    scores = out.router_scores.double()[0]
    top = torch.sort(-scores, stable=True).indices[:2]
    weights = torch.softmax(scores[top] / 4, 0)
    with torch.no_grad():
        parts = [torch.log_softmax(model.experts[int(e)](input_ids=ids).logits[0].double(), -1) for e in top]
    mix = torch.logsumexp(torch.stack([p + w.log() for p, w in zip(parts, weights, strict=True)]), 0)
    assert out.routed_experts[0].tolist() == top.tolist()
    assert torch.allclose(out.logits[0].double(), mix, atol=1e-5)


def test_the_package_routes_with_the_exported_rule():
    """One routing rule: argmax_assignment (the package's inference routing) is the hub file's choose_experts."""
    from smalltalk.hub.modeling_smalltalk import choose_experts
    from smalltalk.routing.assignment import argmax_assignment

    scores = np.array([[1.0, 3.0, 3.0], [-2.0, -1.0, -5.0], [0.0, 0.0, 0.0]])
    assert argmax_assignment(scores).tolist() == [1, 1, 0] == choose_experts(torch.from_numpy(scores))[0][:, 0].tolist()


MC_TASK = TASK.replace("smalltalk_local_mc", "smalltalk_hf_mc")  # the multiple-choice task of test_lm_eval
GEN_TASK = """task: smalltalk_hf_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _tasks(tmp_path: Path, query_words: int = 24) -> Path:
    """24 items from the three synthetic domains; every context is longer than the routing prefix (16 tokens),
    so both sides route on the same tokens (lm-eval's `hf` model passes no attention mask: a shorter row would
    be routed with its padding). `query_words`: the words of each context."""
    docs = make_documents(24, seed=9)
    words = [d["text"].split() for d in docs]
    n = query_words
    mc = [{"query": " ".join(w[:n]), "choices": [" " + " ".join(words[(i + j) % 24][n:n + 3]) for j in range(3)],
           "gold": 0} for i, w in enumerate(words)]
    gen = [{"query": " ".join(w[:n]), "answer": " ".join(w[n:n + 2])} for w in words]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, rows, template in (("mc", mc, MC_TASK), ("gen", gen, GEN_TASK)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(template.format(data=data))
    return tasks


def test_lm_evals_hf_model_on_the_export_equals_smalltalk_eval_downstream(hf_export, pipeline_run, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (our package not importable) and
    `smalltalk eval downstream` on the run: the same log-likelihood for every choice of 24 items (1e-4) and the
    same generated text for 24 generate-until items."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    tasks, out = _tasks(tmp_path), tmp_path / "out"
    args = ["--model", "hf", "--model_args", f"pretrained={hf_export},trust_remote_code=True,dtype=float32",
            "--device", "cpu", "--tasks", "smalltalk_hf_mc,smalltalk_hf_gen", "--include_path", str(tasks),
            "--output_path", str(out), "--log_samples", "--batch_size", "1"]
    _child(f"import sys\nsys.argv = ['lm_eval', *{args!r}]\nfrom lm_eval.__main__ import cli_evaluate\n"
           "cli_evaluate()\n", tmp_path)
    theirs = {}
    for task in ("smalltalk_hf_mc", "smalltalk_hf_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        theirs[task] = {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
    from smalltalk.evaluation.lm_harness import evaluate_downstream

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    ours = evaluate_downstream(str(pipeline_run[0]), ["smalltalk_hf_mc", "smalltalk_hf_gen"], str(tasks))["samples"]
    assert len(ours["smalltalk_hf_mc"]) == len(theirs["smalltalk_hf_mc"]) == 24
    for sample in ours["smalltalk_hf_mc"]:
        other = theirs["smalltalk_hf_mc"][sample["doc_id"]]
        for mine, their in zip(sample["resps"], other["resps"], strict=True):
            assert float(mine[0][0]) == pytest.approx(float(their[0][0]), abs=1e-4)
    for sample in ours["smalltalk_hf_gen"]:
        assert sample["resps"][0][0] == theirs["smalltalk_hf_gen"][sample["doc_id"]]["resps"][0][0]
